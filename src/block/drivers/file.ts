// Protocol driver "file": a host file through a Node FileHandle.
// Options: filename (required), cache.direct (refused: Node cannot guarantee the aligned
// buffers O_DIRECT needs), cache.no-flush, aio (threads|native|io_uring, accepted: Node
// always uses its thread pool), locking (auto|on|off), aio-max-batch, pr-manager (refused).
//
// Locking: with locking on, the image is locked with the same byte-range OFD locks QEMU
// takes, when the native helper is available (src/util/native.ts); otherwise lockstep
// writers exclude each other through an advisory lock on the file's inode kept in-process
// and in a lock table shared by lockstep processes (see file-lock.ts).

import { open as fsOpen, type FileHandle } from 'node:fs/promises';
import { makeCaps, type BlockDriver, type NodeImpl, type BlockStatus } from '../driver.js';
import { BlockError, InvalidArgumentError, STRERROR, type ErrorCode } from '../../errors.js';
import type { GraphOpenContext } from '../graph.js';
import { acquireImageLock, type ImageLock } from './file-lock.js';

async function openHandle(filename: string, readOnly: boolean): Promise<FileHandle> {
  try {
    return await fsOpen(filename, readOnly ? 'r' : 'r+');
  } catch (e) {
    const code = (e as { code?: string }).code ?? 'EIO';
    const text = code in STRERROR ? STRERROR[code as ErrorCode] : String((e as Error).message);
    throw new InvalidArgumentError(`Could not open '${filename}': ${text}`);
  }
}

export const fileDriver: BlockDriver = {
  name: 'file',
  kind: 'protocol',
  async open(ctx, o): Promise<NodeImpl> {
    const filename = o.string('filename', true);
    const locking = o.enumOf('locking', ['auto', 'on', 'off']) ?? 'auto';
    o.enumOf('aio', ['threads', 'native', 'io_uring']);
    o.uint('aio-max-batch');
    o.bool('drop-cache');
    o.bool('x-check-cache-dropped');
    if (o.has('pr-manager')) throw new InvalidArgumentError(`Parameter 'pr-manager' is not supported by lockstep`);
    o.done();
    const cache = (ctx as GraphOpenContext).cache ?? { direct: false, noFlush: false };
    if (cache.direct) {
      throw new InvalidArgumentError(
        `cache.direct=on is not supported: lockstep cannot guarantee the aligned buffers O_DIRECT needs; use cache.direct=off`,
      );
    }
    let readOnly = ctx.readOnly;
    let fh = await openHandle(filename, readOnly);
    let size = (await fh.stat()).size;
    let lock: ImageLock | null = null;
    try {
      if (locking !== 'off') lock = await acquireImageLock(fh, filename, readOnly);
    } catch (e) {
      await fh.close();
      throw e;
    }

    async function read(offset: number, length: number): Promise<Buffer> {
      const buf = Buffer.alloc(length);
      let done = 0;
      while (done < length) {
        const { bytesRead } = await fh.read(buf, done, length - done, offset + done);
        if (bytesRead === 0) break; // past EOF: zeroes
        done += bytesRead;
      }
      return buf;
    }

    async function write(offset: number, data: Buffer): Promise<void> {
      let done = 0;
      try {
        while (done < data.length) {
          const { bytesWritten } = await fh.write(data, done, data.length - done, offset + done);
          done += bytesWritten;
        }
      } catch (e) {
        throw BlockError.fromSystem(e, `write to ${filename}`);
      }
      if (offset + data.length > size) size = offset + data.length;
    }

    return {
      caps: makeCaps({ fua: false, writeZeroes: false, discard: false, blockStatus: false, truncate: true, growable: true }),
      filename,
      getLength: () => size,
      read: async (offset, length) => {
        try {
          return await read(offset, length);
        } catch (e) {
          throw BlockError.fromSystem(e, `read from ${filename}`);
        }
      },
      write: (offset, data) => write(offset, data),
      flush: async () => {
        if (cache.noFlush) return;
        try {
          await fh.datasync();
        } catch (e) {
          throw BlockError.fromSystem(e, `flush of ${filename}`);
        }
      },
      blockStatus: async (_offset, length): Promise<BlockStatus> => ({ length, allocated: true, data: true, zero: false }),
      truncate: async (length) => {
        try {
          await fh.truncate(length);
        } catch (e) {
          throw BlockError.fromSystem(e, `truncate of ${filename}`);
        }
        size = length;
      },
      reopen: async (ro) => {
        if (ro === readOnly) return;
        const nfh = await openHandle(filename, ro);
        const old = fh;
        fh = nfh;
        readOnly = ro;
        if (lock) await lock.reopen(nfh, ro);
        await old.close();
      },
      close: async () => {
        if (lock) await lock.release();
        await fh.close();
      },
      info: () => ({ filename }),
    };
  },
};
