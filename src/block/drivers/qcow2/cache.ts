// Metadata table cache (L2 tables, refcount blocks): whole clusters by host offset, LRU.
// All access happens under the image mutex. Buffers handed out stay valid until the next
// evict(); callers mutate them in place and mark them dirty. Writing dirty tables back in
// the right order is the image's job (image.ts writeback), never the cache's own.

import type { HostFile } from './host-file.js';

interface Entry {
  buf: Buffer;
  dirty: boolean;
}

export class TableCache {
  /** Map iteration order is the LRU order: a hit moves the entry to the end */
  private readonly entries = new Map<number, Entry>();

  constructor(
    private readonly file: HostFile,
    private readonly clusterSize: number,
    /** capacity in tables */
    readonly capacity: number,
    /** the image's overlap check for a table about to be written (overlap.ts) */
    private readonly checkWrite: (offset: number, length: number) => void = () => undefined,
  ) {}

  get size(): number {
    return this.entries.size;
  }

  async get(offset: number): Promise<Buffer> {
    const e = this.entries.get(offset);
    if (e) {
      this.entries.delete(offset);
      this.entries.set(offset, e);
      return e.buf;
    }
    const buf = await this.file.read(offset, this.clusterSize);
    // another caller cannot have loaded it meanwhile: access is under the image mutex
    this.entries.set(offset, { buf, dirty: false });
    return buf;
  }

  /** The table at once when cached (a hit, as get's), else undefined; never loads. */
  peek(offset: number): Buffer | undefined {
    const e = this.entries.get(offset);
    if (!e) return undefined;
    this.entries.delete(offset);
    this.entries.set(offset, e);
    return e.buf;
  }

  /** A zero-filled table that is dirty from the start (a new L2 table or refcount block). */
  create(offset: number, content?: Buffer): Buffer {
    const buf = content ? Buffer.from(content) : Buffer.alloc(this.clusterSize);
    this.entries.set(offset, { buf, dirty: true });
    return buf;
  }

  has(offset: number): boolean {
    return this.entries.has(offset);
  }

  markDirty(offset: number): void {
    const e = this.entries.get(offset);
    if (e) e.dirty = true;
  }

  hasDirty(): boolean {
    for (const e of this.entries.values()) if (e.dirty) return true;
    return false;
  }

  /** true when eviction needs a writeback first (over capacity with dirty entries only) */
  needsWriteback(): boolean {
    if (this.entries.size <= this.capacity) return false;
    let clean = 0;
    for (const e of this.entries.values()) if (!e.dirty) clean++;
    return this.entries.size - clean > this.capacity / 2 || clean < this.entries.size - this.capacity;
  }

  /** Writes every dirty table (ascending offsets, so runs merge in the page cache). */
  async writeDirty(): Promise<number> {
    const dirty = [...this.entries].filter(([, e]) => e.dirty).sort((a, b) => a[0] - b[0]);
    for (const [off, e] of dirty) {
      this.checkWrite(off, e.buf.length);
      await this.file.write(off, e.buf);
      e.dirty = false;
    }
    return dirty.length;
  }

  /** Drops clean entries, least recently used first, down to capacity. */
  evict(): void {
    if (this.entries.size <= this.capacity) return;
    for (const [off, e] of this.entries) {
      if (this.entries.size <= this.capacity) break;
      if (!e.dirty) this.entries.delete(off);
    }
  }

  /** Forgets one table (freed cluster) or everything (make_empty), dirty or not. */
  drop(offset: number): void {
    this.entries.delete(offset);
  }
  clear(): void {
    this.entries.clear();
  }
}
