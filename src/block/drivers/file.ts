// Protocol driver "file": a host file through a Node FileHandle.
// Options: filename (required), cache.direct (refused: Node cannot guarantee the aligned
// buffers O_DIRECT needs), cache.no-flush, aio (threads|native|io_uring, accepted: reads and
// writes go through Node's fs and libuv's thread pool, or through the native helper's
// io_uring with LOCKSTEP_IO_URING=on in the environment, whatever aio says), locking
// (auto|on|off), aio-max-batch, pr-manager (refused), force-share (read-only only: share
// every permission).
//
// Locking (locking=auto|on): the image is locked with the same byte-range OFD locks QEMU
// takes when the native helper is built (src/util/native.ts), so QEMU and other lockstep
// processes are refused as QEMU would refuse them; within one process the same rules hold
// without the helper (see file-lock.ts).
//
// With the native helper the node also answers block status from SEEK_DATA/SEEK_HOLE (holes
// are data:false, zero:true), discards by punching holes, and writes zeroes by punching a
// hole (mayUnmap) or with fallocate(ZERO_RANGE), writing zero buffers where the filesystem
// refuses. Without it, everything is allocated data and the core emulates zeroing.
//
// FUA is native: a FUA write goes through a second descriptor opened with O_DSYNC, so it is
// stable when it completes without syncing the rest of the file (an fdatasync would first
// write back every dirty page of the file: a qcow2 make_empty orders its metadata this way
// without paying for the data it discards). With cache.no-flush FUA is ignored, as flushes are.

import { constants as fsConstants } from 'node:fs';
import { open as fsOpen, statfs, type FileHandle } from 'node:fs/promises';
import { makeCaps, type BlockDriver, type NodeImpl, type BlockStatus, type ZeroFlags } from '../driver.js';
import { BlockError, InvalidArgumentError, STRERROR, isBlockError, type ErrorCode } from '../../errors.js';
import type { GraphOpenContext } from '../graph.js';
import { loadNative } from '../../util/native.js';
import { acquireImageLock, type ImageLock } from './file-lock.js';

/** Largest zero buffer written at once where the filesystem cannot zero a range itself. */
const ZERO_CHUNK = 1024 * 1024;

async function openHandle(filename: string, readOnly: boolean): Promise<FileHandle> {
  try {
    return await fsOpen(filename, readOnly ? 'r' : 'r+');
  } catch (e) {
    const code = (e as { code?: string }).code ?? 'EIO';
    const text = code in STRERROR ? STRERROR[code as ErrorCode] : String((e as Error).message);
    throw new InvalidArgumentError(`Could not open '${filename}': ${text}`);
  }
}

/** statfs f_type of procfs: its files have no length (lseek to the end fails) */
const PROC_SUPER_MAGIC = 0x9fa0;

/**
 * The file's length, refusing what QEMU's file driver refuses: anything but a regular file
 * or a block device (a directory, a FIFO), and procfs files, whose length cannot be read
 * (/proc/self/mem would otherwise read as an empty or endless disk).
 */
async function checkedSize(fh: FileHandle, filename: string): Promise<number> {
  const st = await fh.stat();
  if (!st.isFile() && !st.isBlockDevice()) {
    throw new InvalidArgumentError(`'file' driver requires '${filename}' to be a regular file`);
  }
  if (st.isFile() && (await statfs(filename).catch(() => null))?.type === PROC_SUPER_MAGIC) {
    throw new InvalidArgumentError('Could not refresh total sector count: Invalid argument');
  }
  return st.size;
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
    const forceShare = o.bool('force-share') ?? false;
    o.done();
    const cache = (ctx as GraphOpenContext).cache ?? { direct: false, noFlush: false };
    if (cache.direct) {
      throw new InvalidArgumentError(
        `cache.direct=on is not supported: lockstep cannot guarantee the aligned buffers O_DIRECT needs; use cache.direct=off`,
      );
    }
    let readOnly = ctx.readOnly;
    if (forceShare && !readOnly) throw new InvalidArgumentError('force-share=on can only be used with read-only images');
    const native = loadNative();
    // reads and writes through io_uring when enabled (LOCKSTEP_IO_URING=on): same bytes as fs
    const ring = native?.ring ?? null;
    let fh = await openHandle(filename, readOnly);
    let size: number;
    try {
      size = await checkedSize(fh, filename);
    } catch (e) {
      await fh.close();
      throw e;
    }
    let lock: ImageLock | null = null;
    try {
      if (locking !== 'off') lock = await acquireImageLock(fh, filename, readOnly, forceShare);
    } catch (e) {
      await fh.close();
      throw e;
    }

    // Fills all of buf: what the file holds, zeroes past its end. The buffer is never
    // zero-filled first (a 64 KiB memset per request), only the part past EOF is.
    async function readInto(offset: number, buf: Buffer): Promise<void> {
      const length = buf.length;
      let done = 0;
      try {
        while (done < length) {
          const viaRing = ring?.read(fh.fd, done === 0 ? buf : buf.subarray(done), offset + done);
          const n = viaRing ? await viaRing : (await fh.read(buf, done, length - done, offset + done)).bytesRead;
          if (n === 0) break;
          done += n;
        }
      } catch (e) {
        throw BlockError.fromSystem(e, `read from ${filename}`);
      }
      if (done < length) buf.fill(0, done);
    }

    // the O_DSYNC descriptor for FUA writes, opened at the first one
    let syncFh: Promise<FileHandle> | null = null;
    async function closeSyncFh(): Promise<void> {
      const p = syncFh;
      syncFh = null;
      if (p) await (await p.catch(() => null))?.close();
    }

    async function write(offset: number, data: Buffer, fua = false): Promise<void> {
      let done = 0;
      try {
        let target = fh;
        if (fua && !cache.noFlush) {
          syncFh ??= fsOpen(filename, fsConstants.O_RDWR | fsConstants.O_DSYNC);
          target = await syncFh.catch((e: unknown) => {
            syncFh = null;
            throw e;
          });
        }
        while (done < data.length) {
          const viaRing = ring?.write(target.fd, done === 0 ? data : data.subarray(done), offset + done);
          done += viaRing ? await viaRing : (await target.write(data, done, data.length - done, offset + done)).bytesWritten;
        }
      } catch (e) {
        throw BlockError.fromSystem(e, `write to ${filename}`);
      }
      if (offset + data.length > size) size = offset + data.length;
    }

    async function writeZeroBuffers(offset: number, length: number): Promise<void> {
      const zeroes = Buffer.alloc(Math.min(length, ZERO_CHUNK));
      for (let pos = offset; pos < offset + length; pos += zeroes.length) {
        await write(pos, zeroes.subarray(0, Math.min(zeroes.length, offset + length - pos)));
      }
    }

    // Learned once per node, like QEMU's has_write_zeroes/has_discard: a filesystem that
    // refused a fallocate mode refuses it for good.
    let canPunch = true;
    let canZeroRange = true;

    async function punch(offset: number, length: number): Promise<boolean> {
      if (!native || !canPunch) return false;
      try {
        await native.punchHole(fh.fd, offset, length);
        return true;
      } catch (e) {
        if (!isBlockError(e, 'ENOTSUP')) throw e;
        canPunch = false;
        return false;
      }
    }

    async function writeZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
      const end = offset + length;
      // a punched hole never grows the file: the part past EOF is zeroed below
      const inside = Math.min(end, size);
      let from = offset;
      if (flags.mayUnmap && inside > offset && (await punch(offset, inside - offset))) from = inside;
      if (from >= end) return;
      if (native && canZeroRange) {
        try {
          await native.zeroRange(fh.fd, from, end - from);
          if (end > size) size = end;
          return;
        } catch (e) {
          if (!isBlockError(e, 'ENOTSUP')) throw e;
          canZeroRange = false;
        }
      }
      if (flags.noFallback) throw new BlockError('ENOTSUP', `${filename}: the filesystem cannot zero a range`);
      await writeZeroBuffers(from, end - from);
    }

    // QEMU's find_allocation: one lseek(SEEK_DATA), and lseek(SEEK_HOLE) when in data.
    function sparseStatus(offset: number, length: number): BlockStatus {
      const end = offset + length;
      let data = true;
      let runEnd = end;
      try {
        const d = native!.seekData(fh.fd, offset);
        if (d === -1 || d > offset) {
          data = false; // a hole up to the next data, or to EOF
          if (d !== -1) runEnd = Math.min(d, end);
        } else if (d === offset) {
          const h = native!.seekHole(fh.fd, offset);
          if (h > offset) runEnd = Math.min(h, end);
          // h <= offset: the file changed between the two calls; report data, which is safe
        }
      } catch {
        // the filesystem cannot tell: everything is data, as QEMU reports it
      }
      // no `file`: a protocol node holds its own bytes, and naming itself would invite callers
      // that descend into `file` to loop
      return { length: runEnd - offset, allocated: true, data, zero: !data, hostOffset: offset };
    }

    return {
      caps: makeCaps({
        fua: true,
        writeZeroes: native !== null,
        discard: native !== null,
        blockStatus: native !== null,
        truncate: true,
        growable: true,
      }),
      filename,
      getLength: () => size,
      read: async (offset, length) => {
        // not pooled (allocUnsafe shares small buffers): the caller owns a buffer of its own
        const buf = Buffer.allocUnsafeSlow(length);
        await readInto(offset, buf);
        return buf;
      },
      readInto,
      write: (offset, data, flags) => write(offset, data, flags?.fua ?? false),
      writeZeroes: async (offset, length, flags) => {
        await writeZeroes(offset, length, flags);
        // fallocate and punched holes are metadata: FUA needs the whole-file sync here
        if (flags.fua && !cache.noFlush) await fh.datasync().catch((e: unknown) => {
          throw BlockError.fromSystem(e, `flush of ${filename}`);
        });
      },
      discard: async (offset, length) => {
        const end = Math.min(offset + length, size);
        if (end > offset) await punch(offset, end - offset); // advisory: a refusal is fine
      },
      flush: async () => {
        if (cache.noFlush) return;
        try {
          await fh.datasync();
        } catch (e) {
          throw BlockError.fromSystem(e, `flush of ${filename}`);
        }
      },
      blockStatus: async (offset, length): Promise<BlockStatus> =>
        native ? sparseStatus(offset, length) : { length, allocated: true, data: true, zero: false },
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
        try {
          if (lock) await lock.reopen(nfh, ro);
        } catch (e) {
          await nfh.close();
          throw e;
        }
        const old = fh;
        fh = nfh;
        readOnly = ro;
        await old.close();
        await closeSyncFh();
      },
      close: async () => {
        if (lock) await lock.release();
        await closeSyncFh();
        await fh.close();
      },
      info: () => ({ filename }),
    };
  },
};
