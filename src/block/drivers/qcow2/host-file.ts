// The byte store under a qcow2 image: the node's `file` child when the driver runs in a
// graph, or a host file handle for create/check (which work without a graph).

import { open as fsOpen, type FileHandle } from 'node:fs/promises';
import { BlockError } from '../../../errors.js';
import type { BlockNode } from '../../node.js';
import type { PreparedReplacement } from '../../driver.js';

export type { PreparedReplacement };

export interface HostFile {
  /** reads past the end return zeroes */
  read(offset: number, length: number): Promise<Buffer>;
  /** read() into the caller's buffer (all of it); absent: read() and a copy */
  readInto?(offset: number, buf: Buffer): Promise<void>;
  /** `stable`: the data is on stable storage when the write completes (FUA), without
   *  syncing anything else written before it */
  write(offset: number, data: Buffer, stable?: boolean): Promise<void>;
  flush(): Promise<void>;
  length(): number;
  truncate(length: number): Promise<void>;
  /** Zeroes a range without writing buffers (fallocate's zero range); false when the store
   *  cannot, and the caller writes the zeroes itself. */
  zeroRange?(offset: number, length: number): Promise<boolean>;
  /**
   * A fresh file holding `content`, prepared (stable) beside this one to take its place
   * atomically when committed; absent when the store cannot be replaced.
   */
  prepareReplacement?(content: Buffer): Promise<PreparedReplacement>;
}

export function nodeHostFile(node: BlockNode): HostFile {
  return {
    read: (offset, length) => node.read(offset, length),
    readInto: (offset, buf) => node.readInto(offset, buf),
    write: (offset, data, stable) => node.write(offset, data, stable ? { fua: true } : undefined),
    flush: () => node.flush(),
    length: () => node.getLength(),
    truncate: (length) => node.truncate(length),
    zeroRange: async (offset, length) => {
      try {
        await node.writeZeroes(offset, length, { noFallback: true });
        return true;
      } catch (e) {
        if (e instanceof BlockError && e.code === 'ENOTSUP') return false;
        throw e;
      }
    },
    ...(node.caps.replace ? { prepareReplacement: (content: Buffer) => node.prepareReplacement(content) } : {}),
  };
}

export class FsHostFile implements HostFile {
  private constructor(
    private readonly fh: FileHandle,
    private size: number,
    readonly filename: string,
  ) {}

  static async open(filename: string, writable: boolean, create = false): Promise<FsHostFile> {
    const fh = await fsOpen(filename, create ? 'w+' : writable ? 'r+' : 'r');
    const size = (await fh.stat()).size;
    return new FsHostFile(fh, size, filename);
  }

  async read(offset: number, length: number): Promise<Buffer> {
    const buf = Buffer.alloc(length);
    let done = 0;
    try {
      while (done < length) {
        const { bytesRead } = await this.fh.read(buf, done, length - done, offset + done);
        if (bytesRead === 0) break;
        done += bytesRead;
      }
    } catch (e) {
      throw BlockError.fromSystem(e, `read from ${this.filename}`);
    }
    return buf;
  }

  async write(offset: number, data: Buffer, stable = false): Promise<void> {
    let done = 0;
    try {
      while (done < data.length) {
        const { bytesWritten } = await this.fh.write(data, done, data.length - done, offset + done);
        done += bytesWritten;
      }
    } catch (e) {
      throw BlockError.fromSystem(e, `write to ${this.filename}`);
    }
    this.size = Math.max(this.size, offset + data.length);
    // create/check run without a graph: a whole-file sync is their FUA
    if (stable) await this.flush();
  }

  async flush(): Promise<void> {
    try {
      await this.fh.datasync();
    } catch (e) {
      throw BlockError.fromSystem(e, `flush of ${this.filename}`);
    }
  }

  length(): number {
    return this.size;
  }

  async truncate(length: number): Promise<void> {
    await this.fh.truncate(length);
    this.size = length;
  }

  async close(): Promise<void> {
    await this.fh.close();
  }
}
