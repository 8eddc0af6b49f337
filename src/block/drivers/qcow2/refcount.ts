// Refcounts: the refcount table (kept in memory), refcount blocks (through a TableCache),
// and cluster allocation.
//
// Allocation follows QEMU's order so that images we create and grow have QEMU's layout:
// first fit from a moving free-cluster index; when the refcount update of a new range needs
// a refcount block that does not exist yet, the block is allocated (at the next free
// cluster, describing itself when it falls in its own range), the partial update is undone
// and the search restarts. Counting a cluster never needs more than that one retry loop.
//
// Crash safety: a new refcount block is only hooked into the table (an in-memory dirty
// entry) — the image writes refcount blocks, then table entries, then L2/L1 (image.ts).
// Callers hold the image mutex.
//
// A read-only image checks the table at open but keeps it only once something needs it
// (a reopen for writing): reads never look at it, and a 300-deep chain of 1 GiB images
// held 300 tables of 8192 entries for nothing.

import { BlockError, assert } from '../../../errors.js';
import type { TableCache } from './cache.js';
import { OL } from './overlap.js';
import type { HostFile } from './host-file.js';

export interface RefcountLayout {
  clusterBits: number;
  refcountOrder: number;
  tableOffset: number;
  tableClusters: number;
}

export class Refcounts {
  readonly clusterSize: number;
  readonly refBits: number;
  /** entries per refcount block */
  readonly blockEntries: number;
  readonly maxRefcount: number;
  /** the table as loaded and kept; empty before any load (create's first steps); null
   *  after load(false) until ensureLoaded */
  private kept: number[] | null = [];
  tableOffset: number;
  tableClusters: number;
  /** table indexes changed in memory and not yet written */
  readonly dirtyTable = new Set<number>();
  /** first cluster index that may be free (QEMU's free_cluster_index) */
  freeIndex = 0;
  /**
   * One past the highest table index that may hold a block (QEMU's max_refcount_table_index
   * + 1), for the table `usedFor`: the overlap checks before every data write scan only that
   * far instead of the whole table (8192 entries for a 1 GiB image, most of them zero).
   * Counted again from the table whenever the table is a new array (load, growth); a block
   * is only ever added to the table by allocBlock, which moves it up.
   */
  private usedEnd = 0;
  private usedFor: readonly number[] | null = null;

  constructor(
    private readonly file: HostFile,
    layout: RefcountLayout,
    readonly cache: TableCache,
    /** writes the header's refcount_table_offset/clusters (after a table move) */
    private readonly moveTable: (offset: number, clusters: number) => Promise<void>,
    /** the image's overlap check (overlap.ts): throws when a write would hit other metadata */
    private readonly checkWrite: (ignore: number, offset: number, length: number) => void = () => undefined,
  ) {
    this.clusterSize = 2 ** layout.clusterBits;
    this.refBits = 2 ** layout.refcountOrder;
    this.blockEntries = (this.clusterSize * 8) / this.refBits;
    this.maxRefcount = this.refBits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** this.refBits - 1;
    this.tableOffset = layout.tableOffset;
    this.tableClusters = layout.tableClusters;
  }

  /** Refcount block offsets by table index (0: none); only once loaded and kept. */
  get table(): number[] {
    assert(this.kept !== null, 'qcow2: the refcount table is loaded before it is used');
    return this.kept;
  }

  get loaded(): boolean {
    return this.kept !== null;
  }

  /**
   * Reads the refcount table; checks every entry is aligned and inside the file, then hands
   * each non-zero entry to `check` (the image's checks against other metadata). Keeps the
   * table when `keep`; a read-only image passes false and loads it again with
   * ensureLoaded before it may be written.
   */
  async load(keep: boolean, check: (index: number, offset: number) => void = () => undefined): Promise<void> {
    const bytes = this.tableClusters * this.clusterSize;
    const fileLen = this.file.length();
    if (this.tableOffset + bytes > fileLen) {
      throw new BlockError('EIO', `qcow2: refcount table [0x${this.tableOffset.toString(16)}, +${bytes}) extends past the end of the file (${fileLen} bytes)`);
    }
    const buf = await this.file.read(this.tableOffset, bytes);
    const n = bytes / 8;
    const entry = (i: number): number => buf.readUInt32BE(i * 8) * 2 ** 32 + buf.readUInt32BE(i * 8 + 4);
    if (!keep) this.kept = null;
    for (let i = 0; i < n; i++) {
      const off = entry(i);
      if (off % this.clusterSize !== 0 || off >= 2 ** 56) {
        throw new BlockError('EIO', `qcow2: refcount block offset 0x${off.toString(16)} (refcount table entry ${i}) is invalid (not cluster aligned)`);
      }
      if (off !== 0 && off + this.clusterSize > fileLen) {
        throw new BlockError('EIO', `qcow2: refcount block ${i} at 0x${off.toString(16)} lies past the end of the file (${fileLen} bytes)`);
      }
    }
    for (let i = 0; i < n; i++) {
      const off = entry(i);
      if (off !== 0) check(i, off);
    }
    if (keep) this.kept = Array.from({ length: n }, (_, i) => entry(i));
  }

  /** Loads the table (with load's checks) unless it is kept already. */
  async ensureLoaded(check?: (index: number, offset: number) => void): Promise<void> {
    if (!this.kept) await this.load(true, check);
  }

  /** Table entries [0, usedEntries()) hold every refcount block (the rest are zero). */
  usedEntries(): number {
    if (this.usedFor !== this.table) {
      let end = this.table.length;
      while (end > 0 && !this.table[end - 1]) end--;
      this.usedEnd = end;
      this.usedFor = this.table;
    }
    return this.usedEnd;
  }

  getEntry(block: Buffer, i: number): number {
    switch (this.refBits) {
      case 16:
        return block.readUInt16BE(i * 2);
      case 8:
        return block[i]!;
      case 32:
        return block.readUInt32BE(i * 4);
      case 64: {
        const v = block.readBigUInt64BE(i * 8);
        return v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(v);
      }
      default: {
        const bit = i * this.refBits;
        return (block[bit >> 3]! >> (bit & 7)) & ((1 << this.refBits) - 1);
      }
    }
  }

  setEntry(block: Buffer, i: number, v: number): void {
    switch (this.refBits) {
      case 16:
        block.writeUInt16BE(v, i * 2);
        return;
      case 8:
        block[i] = v;
        return;
      case 32:
        block.writeUInt32BE(v, i * 4);
        return;
      case 64:
        block.writeBigUInt64BE(BigInt(v), i * 8);
        return;
      default: {
        const bit = i * this.refBits;
        const mask = ((1 << this.refBits) - 1) << (bit & 7);
        block[bit >> 3] = (block[bit >> 3]! & ~mask) | ((v << (bit & 7)) & mask);
      }
    }
  }

  async get(cluster: number): Promise<number> {
    const idx = Math.floor(cluster / this.blockEntries);
    const off = this.table[idx];
    if (!off) return 0;
    const block = await this.cache.get(off);
    return this.getEntry(block, cluster % this.blockEntries);
  }

  /**
   * QEMU's first fit: n contiguous clusters with refcount 0 from the free index on. Scans a
   * refcount block at a time (one cache lookup per block, not per cluster); clusters without
   * a refcount block are free.
   */
  private async findFree(n: number): Promise<number> {
    let run = 0;
    while (run < n) {
      const idx = Math.floor(this.freeIndex / this.blockEntries);
      const end = (idx + 1) * this.blockEntries;
      const off = this.table[idx];
      if (!off) {
        const take = Math.min(n - run, end - this.freeIndex);
        run += take;
        this.freeIndex += take;
        continue;
      }
      const block = await this.cache.get(off);
      while (run < n && this.freeIndex < end) {
        const v = this.getEntry(block, this.freeIndex % this.blockEntries);
        this.freeIndex++;
        run = v !== 0 ? 0 : run + 1;
      }
    }
    return this.freeIndex - n;
  }

  /**
   * Adds `delta` to the refcounts of clusters [start, start+n). Returns false when it had to
   * create refcount metadata first: nothing was changed then, and the caller restarts.
   */
  async update(start: number, n: number, delta: number): Promise<boolean> {
    let curIdx = -1;
    let block: Buffer | null = null;
    for (let i = 0; i < n; i++) {
      const c = start + i;
      const idx = Math.floor(c / this.blockEntries);
      if (idx !== curIdx) {
        const off = idx < this.table.length ? this.table[idx]! : 0;
        if (off === 0) {
          if (delta < 0) throw new BlockError('EIO', `qcow2: freeing cluster ${c} that has no refcount block (corrupt refcounts)`);
          if (idx >= this.table.length) await this.growTable(idx);
          else await this.allocBlock(idx);
          if (i > 0) await this.update(start, i, -delta);
          return false;
        }
        this.checkWrite(OL.REFCOUNT_BLOCK, off, this.clusterSize);
        block = await this.cache.get(off);
        this.cache.markDirty(off);
        curIdx = idx;
      }
      const j = c % this.blockEntries;
      const v = this.getEntry(block!, j) + delta;
      if (v < 0 || v > this.maxRefcount) {
        if (i > 0) await this.update(start, i, -delta);
        throw new BlockError('EIO', `qcow2: refcount of cluster ${c} would become ${v} (limit ${this.maxRefcount}): corrupt refcounts`);
      }
      this.setEntry(block!, j, v);
      if (v === 0 && c < this.freeIndex) this.freeIndex = c;
    }
    return true;
  }

  /** Allocates n contiguous clusters (refcount 1); returns the first cluster index. */
  async alloc(n: number): Promise<number> {
    for (;;) {
      const start = await this.findFree(n);
      if (await this.update(start, n, 1)) return start;
    }
  }

  private async allocBlock(idx: number): Promise<void> {
    const nb = await this.findFree(1);
    // a new block on other metadata means the refcounts are wrong (a zeroed table entry)
    this.checkWrite(OL.REFCOUNT_BLOCK, nb * this.clusterSize, this.clusterSize);
    let block: Buffer;
    if (Math.floor(nb / this.blockEntries) === idx) {
      block = this.cache.create(nb * this.clusterSize);
      this.setEntry(block, nb % this.blockEntries, 1);
    } else {
      // Counting nb needed refcount metadata first: that may have taken nb itself (a grown
      // table), so give up and let the caller restart the whole allocation (QEMU's EAGAIN).
      if (!(await this.update(nb, 1, 1))) return;
      this.cache.create(nb * this.clusterSize);
    }
    this.table[idx] = nb * this.clusterSize;
    if (idx >= this.usedEnd) this.usedEnd = idx + 1;
    this.dirtyTable.add(idx);
  }

  /** Writes the table entries changed in memory (callers flush blocks before). */
  async writeTable(): Promise<boolean> {
    if (this.dirtyTable.size === 0) return false;
    const idxs = [...this.dirtyTable].sort((a, b) => a - b);
    // write whole 512-byte sectors of the table that hold changed entries
    const sectors = new Set(idxs.map((i) => Math.floor(i / 64)));
    for (const s of sectors) {
      const first = s * 64;
      const count = Math.min(64, this.table.length - first);
      const buf = Buffer.alloc(count * 8);
      for (let k = 0; k < count; k++) buf.writeBigUInt64BE(BigInt(this.table[first + k]!), k * 8);
      this.checkWrite(OL.REFCOUNT_TABLE, this.tableOffset + first * 8, buf.length);
      await this.file.write(this.tableOffset + first * 8, buf);
    }
    this.dirtyTable.clear();
    return true;
  }

  /**
   * The table is full: build a bigger one with the refcount blocks that describe it, past
   * every cluster the old table covers, then switch the header to it (QEMU's scheme).
   */
  private async growTable(neededIdx: number): Promise<void> {
    // what the new table will point to must be on disk first
    if ((await this.cache.writeDirty()) > 0) await this.file.flush();
    const cs = this.clusterSize;
    const per = this.blockEntries;
    const fileClusters = Math.ceil(this.file.length() / cs);
    const firstIdx = Math.max(this.table.length, Math.ceil(fileClusters / per));
    const start = firstIdx * per;
    let blocks = 1;
    let tableEntries = 0;
    let tableClusters = 0;
    for (;;) {
      tableEntries = Math.max(neededIdx + 1, firstIdx + blocks, Math.ceil((this.table.length * 3) / 2));
      tableClusters = Math.ceil((tableEntries * 8) / cs);
      tableEntries = (tableClusters * cs) / 8;
      const need = Math.ceil((blocks + tableClusters) / per);
      if (need <= blocks) break;
      blocks = need;
    }
    const newTable = new Array<number>(tableEntries).fill(0);
    for (let i = 0; i < this.table.length; i++) newTable[i] = this.table[i]!;
    const blocksBuf = Buffer.alloc(blocks * cs);
    for (let i = 0; i < blocks; i++) newTable[firstIdx + i] = (start + i) * cs;
    for (let k = 0; k < blocks + tableClusters; k++) {
      const blk = Math.floor(k / per);
      this.setEntry(blocksBuf.subarray(blk * cs, (blk + 1) * cs), k % per, 1);
    }
    const tableOffset = (start + blocks) * cs;
    const tableBuf = Buffer.alloc(tableClusters * cs);
    newTable.forEach((v, i) => tableBuf.writeBigUInt64BE(BigInt(v), i * 8));
    this.checkWrite(OL.NONE, start * cs, blocksBuf.length + tableBuf.length);
    await this.file.write(start * cs, blocksBuf);
    await this.file.write(tableOffset, tableBuf);
    await this.file.flush();
    await this.moveTable(tableOffset, tableClusters);
    const oldOffset = this.tableOffset;
    const oldClusters = this.tableClusters;
    this.kept = newTable;
    this.tableOffset = tableOffset;
    this.tableClusters = tableClusters;
    this.dirtyTable.clear();
    // the header no longer points at the old table: free it
    while (!(await this.update(oldOffset / cs, oldClusters, -1))) {
      /* never allocates on a decrement */
    }
  }
}
