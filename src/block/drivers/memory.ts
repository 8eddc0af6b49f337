// Protocol driver "memory": a sparse in-memory disk for tests. Options: size (required),
// align (request alignment, default 1), max-transfer. Storage is a map of 64 KiB chunks so
// that large sparse disks cost nothing until written; unwritten chunks read as zeroes and
// are reported as holes.

import { makeCaps, type BlockDriver, type BlockStatus, type NodeImpl } from '../driver.js';
import { InvalidArgumentError } from '../../errors.js';

const CHUNK = 64 * 1024;

export class MemoryStore {
  readonly chunks = new Map<number, Buffer>();
  constructor(public size: number) {}

  read(offset: number, length: number): Buffer {
    const out = Buffer.alloc(length);
    for (let pos = offset; pos < offset + length; ) {
      const idx = Math.floor(pos / CHUNK);
      const inOff = pos - idx * CHUNK;
      const n = Math.min(CHUNK - inOff, offset + length - pos);
      const c = this.chunks.get(idx);
      if (c) c.copy(out, pos - offset, inOff, inOff + n);
      pos += n;
    }
    return out;
  }

  write(offset: number, data: Buffer): void {
    this.size = Math.max(this.size, offset + data.length);
    for (let pos = offset; pos < offset + data.length; ) {
      const idx = Math.floor(pos / CHUNK);
      const inOff = pos - idx * CHUNK;
      const n = Math.min(CHUNK - inOff, offset + data.length - pos);
      let c = this.chunks.get(idx);
      if (!c) this.chunks.set(idx, (c = Buffer.alloc(CHUNK)));
      data.copy(c, inOff, pos - offset, pos - offset + n);
      pos += n;
    }
  }

  zero(offset: number, length: number): void {
    for (let pos = offset; pos < offset + length; ) {
      const idx = Math.floor(pos / CHUNK);
      const inOff = pos - idx * CHUNK;
      const n = Math.min(CHUNK - inOff, offset + length - pos);
      const c = this.chunks.get(idx);
      if (c) {
        if (n === CHUNK) this.chunks.delete(idx);
        else c.fill(0, inOff, inOff + n);
      }
      pos += n;
    }
  }

  status(offset: number, length: number): BlockStatus {
    const first = this.chunks.has(Math.floor(offset / CHUNK));
    let pos = offset;
    while (pos < offset + length && this.chunks.has(Math.floor(pos / CHUNK)) === first) {
      pos = (Math.floor(pos / CHUNK) + 1) * CHUNK;
    }
    const n = Math.min(pos, offset + length) - offset;
    return { length: n, allocated: true, data: first, zero: !first };
  }
}

export const memoryDriver: BlockDriver = {
  name: 'memory',
  kind: 'protocol',
  async open(_ctx, o): Promise<NodeImpl> {
    const size = o.size('size', true);
    const align = o.uint('align') ?? 1;
    if (align < 1 || (align & (align - 1)) !== 0) throw new InvalidArgumentError(`Parameter 'align' must be a power of two`);
    const maxTransfer = o.uint('max-transfer');
    o.done();
    const store = new MemoryStore(size);
    return {
      caps: makeCaps({
        requestAlignment: align,
        ...(maxTransfer ? { maxTransfer } : {}),
        writeZeroes: true,
        discard: true,
        blockStatus: true,
        truncate: true,
        growable: true,
      }),
      filename: 'memory',
      getLength: () => store.size,
      read: async (offset, length) => store.read(offset, length),
      write: async (offset, data) => store.write(offset, data),
      writeZeroes: async (offset, length) => store.zero(offset, length),
      discard: async (offset, length) => store.zero(offset, length),
      flush: async () => {},
      blockStatus: async (offset, length) => store.status(offset, length),
      truncate: async (length) => {
        if (length < store.size) store.zero(length, store.size - length);
        store.size = length;
      },
      close: async () => {
        store.chunks.clear();
      },
    };
  },
};
