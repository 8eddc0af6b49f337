// An open qcow2 image: header, L1 table (in memory), L2 and refcount caches, allocation,
// and the ordered metadata writeback. The data path (io.ts) and the driver (index.ts) are
// built on this; create.ts uses it to lay out new images the way QEMU does.
//
// Ordering (crash safety): new metadata is only referenced once what it references is in
// the file. Writeback writes, with a file flush between steps that have something to write:
//   1. refcount blocks (increments of new allocations),
//   2. refcount table entries for new refcount blocks,
//   3. L2 tables,
//   4. L1 entries,
//   5. then applies the deferred frees (refcount decrements of clusters no longer
//      referenced by what was written in 3-4) and writes those refcount blocks.
// A crash between steps leaves at worst leaked clusters (refcount > references).
// Freed clusters are not reused before step 5, so data written into a cluster always
// belongs to exactly one guest cluster.

import { BlockError, InvalidArgumentError, assert } from '../../../errors.js';
import { TableCache } from './cache.js';
import { Mutex } from './mutex.js';
import { Refcounts } from './refcount.js';
import { decodeL1, encodeL1 } from './l2-entry.js';
import { OL, metadataOverlap, overlapMessage, type MetadataLayout, type SnapshotL1 } from './overlap.js';
import {
  INCOMPAT_CORRUPT,
  INCOMPAT_DIRTY,
  serializeHeader,
  type Qcow2Header,
} from './header.js';
import type { HostFile } from './host-file.js';
import type { Pacer } from '../../../util/pacer.js';
import { Quiesce } from '../../../util/quiesce.js';
import { span } from '../../../util/trace.js';

export interface BackingView {
  length(): number;
  read(offset: number, length: number): Promise<Buffer>;
  readInto?(offset: number, buf: Buffer): Promise<void>;
}

export interface ImageOptions {
  readOnly: boolean;
  l2CacheSize?: number;
  refcountCacheSize?: number;
  lazyRefcounts?: boolean;
  /**
   * A read-only open: the refcount table is checked at open but only kept from
   * loadRefcountTable on (only writes and their overlap checks use it; a deep chain of
   * backing files need not hold one table per layer). QEMU keeps it from open on.
   */
  lazyRefcountTable?: boolean;
}

const MAX_L1_BYTES = 32 * 1024 * 1024;
/** QEMU's QCOW_MAX_SNAPSHOTS, QCOW_MAX_SNAPSHOT_EXTRA_DATA and QCOW_MAX_SNAPSHOTS_SIZE */
export const MAX_SNAPSHOTS = 65536;
const MAX_SNAPSHOT_EXTRA = 1024;
const MAX_SNAPSHOTS_BYTES = 64 * 1024 * 1024;

/**
 * A limit QEMU checks at open, with QEMU's message (shown without a "Could not open"
 * prefix of the driver's own, as qemu-img shows it); `checkText`: how `img check` reports
 * it instead, when qemu-img check has its own lines for it.
 */
export class Qcow2OpenError extends InvalidArgumentError {
  constructor(
    message: string,
    readonly checkText?: string,
  ) {
    super(message);
  }
}
const DEFAULT_L2_CACHE_MAX = 32 * 1024 * 1024;

export class Qcow2Image {
  readonly clusterBits: number;
  readonly clusterSize: number;
  /** entries per L2 table */
  readonly l2Entries: number;
  readonly v3: boolean;
  readonly mutex = new Mutex();
  readonly l2Cache: TableCache;
  readonly refcounts: Refcounts;
  l1: number[] = [];
  l1Copied: boolean[] = [];
  readonly dirtyL1 = new Set<number>();
  /** cluster ranges whose refcount drops at the next writeback (step 5) */
  pendingFrees: Array<{ first: number; count: number }> = [];
  backing: BackingView | null = null;
  /** gives the event loop its turn between the L2 tables of a long zero or discard */
  pacer: Pacer | null = null;
  readOnly: boolean;
  lazyRefcounts: boolean;
  /** load() checks the refcount table without keeping it (ImageOptions) */
  private readonly lazyRefcountTable: boolean;
  /** set when a structural problem was found: no more writes */
  corruptReason: string | null = null;
  /** the internal snapshots' L1 tables and the snapshot table's size (overlap checks) */
  snapshots: SnapshotL1[] = [];
  snapshotsBytes = 0;
  /** called once when a write is prevented (QEMU's BLOCK_IMAGE_CORRUPTED and stderr line) */
  onCorruption: ((msg: string, offset: number, size: number, fatal: boolean) => void) | null = null;
  /** a corruption was signalled (QEMU reports the first one only) */
  private signaled = false;
  /** nothing at all is written any more, not even cached metadata (QEMU drops the node) */
  fatallyCorrupt = false;
  /** the corrupt bit's header write, when one is under way */
  private corruptBitWrite: Promise<void> | null = null;
  /** data I/O in flight outside the mutex (frees wait for it) */
  private readonly dataIo = new Quiesce();
  private dirtyBitWritten = false;
  /**
   * make_empty's truncation of the file, still running: nothing is allocated (and so
   * nothing is written past the metadata) until it has completed.
   */
  private pendingTruncate: Promise<void> | null = null;
  private truncateError: unknown = null;

  constructor(
    readonly file: HostFile,
    public header: Qcow2Header,
    opts: ImageOptions,
  ) {
    this.clusterBits = header.clusterBits;
    this.clusterSize = 2 ** header.clusterBits;
    this.l2Entries = this.clusterSize / 8;
    this.v3 = header.version === 3;
    this.readOnly = opts.readOnly;
    this.lazyRefcounts = opts.lazyRefcounts ?? false;
    this.lazyRefcountTable = opts.lazyRefcountTable ?? false;
    const cs = this.clusterSize;
    // Default L2 cache: enough to map the whole disk, capped at 32 MiB (QEMU's default).
    const l2Bytes = opts.l2CacheSize ?? Math.min(DEFAULT_L2_CACHE_MAX, Math.ceil(header.size / this.l2Entries / cs) * cs + cs);
    const rcBytes = opts.refcountCacheSize ?? Math.max(4 * cs, Math.min(l2Bytes / 4, 1024 * 1024));
    this.l2Cache = new TableCache(file, cs, Math.max(2, Math.floor(l2Bytes / cs)), (o, l) => this.checkOverlap(OL.ACTIVE_L2, o, l));
    const rcCache = new TableCache(file, cs, Math.max(2, Math.floor(rcBytes / cs)), (o, l) => this.checkOverlap(OL.REFCOUNT_BLOCK, o, l));
    this.refcounts = new Refcounts(
      file,
      {
        clusterBits: header.clusterBits,
        refcountOrder: header.refcountOrder,
        tableOffset: header.refcountTableOffset,
        tableClusters: header.refcountTableClusters,
      },
      rcCache,
      async (offset, clusters) => {
        this.header.refcountTableOffset = offset;
        this.header.refcountTableClusters = clusters;
        await this.writeHeader();
      },
      (ignore, o, l) => this.checkOverlap(ignore, o, l),
    );
  }

  /** Loads the L1 and refcount tables, checking they lie inside the file and do not overlap. */
  async load(): Promise<void> {
    const h = this.header;
    const cs = this.clusterSize;
    const fileLen = this.file.length();
    const l1Bytes = h.l1Size * 8;
    // QEMU's order: the snapshot count before the L1 table
    if (h.nbSnapshots > MAX_SNAPSHOTS) {
      throw new Qcow2OpenError(
        'Snapshot table too large',
        `ERROR snapshot table too large\nYou can force-remove all ${h.nbSnapshots - MAX_SNAPSHOTS} overhanging snapshots with qemu-img check -r all\n`,
      );
    }
    if (l1Bytes > MAX_L1_BYTES) throw new Qcow2OpenError('Active L1 table too large');
    if (h.l1Size < this.l1SizeFor(h.size)) {
      throw new BlockError('EIO', `qcow2: L1 table is too small (${h.l1Size} entries for a ${h.size}-byte disk)`);
    }
    if (h.l1Size > 0 && (h.l1TableOffset === 0 || h.l1TableOffset + l1Bytes > fileLen)) {
      throw new BlockError('EIO', `qcow2: L1 table [0x${h.l1TableOffset.toString(16)}, +${l1Bytes}) is outside the file (${fileLen} bytes)`);
    }
    const rtStart = h.refcountTableOffset;
    const rtEnd = rtStart + h.refcountTableClusters * cs;
    if (h.refcountTableClusters * cs > 8 * 1024 * 1024) throw new BlockError('EFBIG', 'qcow2: reference count table too large');
    if (rtStart < cs) throw new BlockError('EIO', 'qcow2: refcount table overlaps the image header');
    if (h.l1Size > 0 && h.l1TableOffset < rtEnd && rtStart < h.l1TableOffset + l1Bytes) {
      throw new BlockError('EIO', `qcow2: refcount table [0x${rtStart.toString(16)}, 0x${rtEnd.toString(16)}) overlaps the L1 table at 0x${h.l1TableOffset.toString(16)}`);
    }
    if (h.l1Size > 0 && h.l1TableOffset < cs) throw new BlockError('EIO', 'qcow2: L1 table overlaps the image header');
    await this.loadSnapshots();
    await this.refcounts.load(!this.lazyRefcountTable, this.checkRefcountBlock);
    this.l1 = new Array<number>(h.l1Size).fill(0);
    this.l1Copied = new Array<boolean>(h.l1Size).fill(false);
    if (h.l1Size > 0) {
      const buf = await this.file.read(h.l1TableOffset, l1Bytes);
      for (let i = 0; i < h.l1Size; i++) {
        const hi = buf.readUInt32BE(i * 8);
        const lo = buf.readUInt32BE(i * 8 + 4);
        const e = decodeL1(hi, lo);
        if (e.offset % cs !== 0) throw new BlockError('EIO', `qcow2: L2 table offset 0x${e.offset.toString(16)} (L1 entry ${i}) is not cluster aligned`);
        this.l1[i] = e.offset;
        this.l1Copied[i] = e.copied;
      }
    }
  }

  /**
   * Open's check of a refcount block's place, before the L1 table is read (so against the
   * header, the refcount table and the snapshot table), run again by loadRefcountTable.
   */
  private readonly checkRefcountBlock = (i: number, off: number): void => {
    const cs = this.clusterSize;
    const h = this.header;
    const rt = this.refcounts.tableOffset;
    const hit =
      off < cs ||
      (off < rt + this.refcounts.tableClusters * cs && rt < off + cs) ||
      (h.nbSnapshots > 0 && off < h.snapshotsOffset + cs && h.snapshotsOffset < off + cs);
    if (hit) throw new BlockError('EIO', `qcow2: refcount block ${i} at 0x${off.toString(16)} overlaps other metadata (header, L1 or refcount table)`);
  };

  /**
   * Loads the refcount table a read-only open checked but did not keep (lazyRefcountTable),
   * with open's checks: before the image is written (reopen read-write). Holds the mutex.
   */
  async loadRefcountTable(): Promise<void> {
    await this.refcounts.ensureLoaded(this.checkRefcountBlock);
  }

  /**
   * Reads the snapshot table's entries as far as the overlap checks need them (each
   * snapshot's L1 table), with QEMU's limits and messages (qcow2_read_snapshots).
   */
  private async loadSnapshots(): Promise<void> {
    const h = this.header;
    this.snapshots = [];
    this.snapshotsBytes = 0;
    if (h.nbSnapshots === 0) return;
    const start = h.snapshotsOffset;
    let chunk: Buffer = Buffer.alloc(0);
    let chunkAt = start;
    const bytesAt = async (off: number, len: number): Promise<Buffer> => {
      if (off < chunkAt || off + len > chunkAt + chunk.length) {
        chunkAt = off;
        chunk = await this.file.read(off, Math.max(len, 65536));
      }
      return chunk.subarray(off - chunkAt, off - chunkAt + len);
    };
    let off = start;
    for (let i = 0; i < h.nbSnapshots; i++) {
      const fixed = await bytesAt(off, 40);
      const l1Offset = Number(fixed.readBigUInt64BE(0));
      const l1Size = fixed.readUInt32BE(8);
      const idLen = fixed.readUInt16BE(12);
      const nameLen = fixed.readUInt16BE(14);
      const extra = fixed.readUInt32BE(36);
      if (extra > MAX_SNAPSHOT_EXTRA) {
        const msg = `Too much extra metadata in snapshot table entry ${i}`;
        const hint = 'You can force-remove this extra metadata with qemu-img check -r all';
        throw new Qcow2OpenError(`${msg}\n${hint}`, `ERROR failed to read the snapshot table: ${msg}\n${hint}\n`);
      }
      off += 40 + extra + idLen + nameLen;
      off = Math.ceil(off / 8) * 8;
      if (off - start > MAX_SNAPSHOTS_BYTES) {
        throw new Qcow2OpenError('Snapshot table exceeds the size limit', 'ERROR failed to read the snapshot table: Snapshot table exceeds the size limit\n');
      }
      this.snapshots.push({ l1Offset, l1Size });
    }
    this.snapshotsBytes = off - start;
  }

  /** What the overlap checks compare against (overlap.ts). */
  metadataLayout(): MetadataLayout {
    const h = this.header;
    return {
      clusterSize: this.clusterSize,
      l1Offset: h.l1TableOffset,
      l1: this.l1,
      refcountTableOffset: this.refcounts.tableOffset,
      refcountTableBytes: this.refcounts.tableClusters * this.clusterSize,
      refcountTable: this.refcounts.table,
      refcountTableUsed: this.refcounts.usedEntries(),
      snapshotsOffset: h.snapshotsOffset,
      snapshotsBytes: this.snapshotsBytes,
      snapshots: this.snapshots,
    };
  }

  /**
   * QEMU's pre-write overlap check: fails (EIO) and marks the image corrupt when
   * [offset, offset+size) overlaps metadata other than `ignore`.
   */
  checkOverlap(ignore: number, offset: number, size: number): void {
    const kind = metadataOverlap(this.metadataLayout(), ignore, offset, size);
    if (kind !== 0) throw this.signalCorruption(overlapMessage(kind), offset, size);
  }

  /**
   * A fatal corruption (QEMU's qcow2_signal_corruption): the corrupt bit is written to the
   * header (v3, writable images), nothing more is written, and the caller's request fails
   * with EIO. Returns the error to throw.
   */
  signalCorruption(msg: string, offset: number, size: number): BlockError {
    const first = !this.signaled;
    const fatal = !this.readOnly;
    this.signaled = true;
    this.corruptReason ??= msg;
    if (fatal) this.fatallyCorrupt = true;
    if (first) {
      this.onCorruption?.(msg, offset, size, fatal);
      if (fatal && this.v3) {
        this.header.incompatible |= INCOMPAT_CORRUPT;
        const bits = Buffer.alloc(8);
        bits.writeBigUInt64BE(this.header.incompatible);
        // only the incompatible-features field, as QEMU writes it
        this.corruptBitWrite = this.file
          .write(72, bits)
          .then(() => this.file.flush())
          .catch(() => undefined);
      }
    }
    return new BlockError('EIO', `qcow2: ${msg}`);
  }

  /** Waits for the corrupt bit's write (close, flush). */
  async settleCorruptBit(): Promise<void> {
    if (this.corruptBitWrite) await this.corruptBitWrite;
  }

  l1SizeFor(size: number): number {
    return Math.ceil(size / (this.clusterSize * this.l2Entries));
  }

  /** true if [off, off+len) touches the header, the L1 table or the refcount table */
  overlapsFixedMetadata(off: number, len: number): boolean {
    const h = this.header;
    const cs = this.clusterSize;
    if (off < cs) return true;
    const rt = this.refcounts.tableOffset;
    if (off < rt + this.refcounts.tableClusters * cs && rt < off + len) return true;
    const l1Bytes = this.l1.length * 8;
    if (l1Bytes > 0 && off < h.l1TableOffset + roundUpTo(l1Bytes, cs) && h.l1TableOffset < off + len) return true;
    if (h.nbSnapshots > 0 && off < h.snapshotsOffset + cs && h.snapshotsOffset < off + len) return true;
    return false;
  }

  markCorrupt(reason: string): BlockError {
    this.corruptReason ??= reason;
    return new BlockError('EIO', `qcow2: ${reason}; the image is not written to any more`);
  }

  checkWritable(): void {
    if (this.readOnly) throw new BlockError('EPERM', 'qcow2 image is read-only');
    if (this.corruptReason) throw new BlockError('EIO', `qcow2: image is corrupt (${this.corruptReason}); refusing to write`);
    if (this.header.incompatible & INCOMPAT_CORRUPT) throw new BlockError('EIO', 'qcow2: Image is corrupt; cannot be opened read/write');
  }

  // ---- tables -------------------------------------------------------------------------

  /** The L2 table of L1 index i (null when unallocated). Validates the offset. */
  async getL2(i: number): Promise<Buffer | null> {
    const off = this.l1[i] ?? 0;
    if (off === 0) return null;
    if (off + this.clusterSize > this.file.length() && !this.l2Cache.has(off)) {
      throw this.markCorrupt(`L2 table at 0x${off.toString(16)} (L1 entry ${i}) lies past the end of the file`);
    }
    return this.l2Cache.get(off);
  }

  /**
   * The L2 table of L1 index i, ready to be changed: allocated when missing, copied when
   * shared with a snapshot (L1 entry without the COPIED flag). Marks it dirty.
   */
  async getL2ForWrite(i: number): Promise<Buffer> {
    assert(i < this.l1.length, 'L1 index in range');
    const off = this.l1[i]!;
    if (off !== 0 && this.l1Copied[i]) {
      // the table is changed in place: it must not be other metadata (checked now, so that
      // the guest's request fails rather than a later writeback)
      this.checkOverlap(OL.ACTIVE_L2, off, this.clusterSize);
      const t = await this.getL2(i);
      this.l2Cache.markDirty(off);
      return t!;
    }
    // the table copied away is freed: it must not be other metadata (a hostile L1 entry)
    if (off !== 0) this.checkOverlap(OL.ACTIVE_L2, off, this.clusterSize);
    await this.settleTruncate();
    await this.markDirtyBit();
    const old = off !== 0 ? await this.getL2(i) : null;
    const oldCopy = old ? Buffer.from(old) : undefined;
    const nc = await this.refcounts.alloc(1);
    const noff = nc * this.clusterSize;
    this.checkOverlap(OL.NONE, noff, this.clusterSize);
    const t = this.l2Cache.create(noff, oldCopy);
    if (off !== 0) this.pendingFrees.push({ first: off / this.clusterSize, count: 1 });
    this.l1[i] = noff;
    this.l1Copied[i] = true;
    this.dirtyL1.add(i);
    return t;
  }

  /** Starts truncating the file in the background (make_empty); see pendingTruncate. */
  startTruncate(length: number): void {
    const prev = this.pendingTruncate;
    this.pendingTruncate = (async () => {
      if (prev) await prev;
      await this.file.truncate(length);
    })().catch((e: unknown) => {
      this.truncateError = e;
    });
  }

  /** Waits for a background truncation; called before any cluster is allocated. */
  async settleTruncate(): Promise<void> {
    if (this.pendingTruncate) {
      await this.pendingTruncate;
      this.pendingTruncate = null;
    }
    if (this.truncateError) {
      const e = this.truncateError;
      this.truncateError = null;
      throw BlockError.fromSystem(e, 'qcow2: truncating the image file after make_empty');
    }
  }

  /** Allocates n contiguous data clusters; returns the host byte offset. */
  async allocData(n: number): Promise<number> {
    await this.settleTruncate();
    await this.markDirtyBit();
    const c = await this.refcounts.alloc(n);
    const off = c * this.clusterSize;
    this.checkOverlap(OL.NONE, off, n * this.clusterSize);
    return off;
  }

  /** Queues freeing data clusters; clusters that are metadata are never freed (corrupt). */
  free(first: number, count: number): void {
    this.checkOverlap(OL.NONE, first * this.clusterSize, count * this.clusterSize);
    this.pendingFrees.push({ first, count });
  }

  // ---- clusters being allocated ---------------------------------------------------------

  /** guest cluster runs whose allocating write is between phase 1 and 3 (io.ts) */
  private readonly allocating = new Map<number, { n: number; done: Promise<void> }>();

  /** A promise for an allocation in flight touching guest clusters [first, last], or null. */
  allocationInFlight(first: number, last: number): Promise<void> | null {
    for (const [c, a] of this.allocating) if (c <= last && first < c + a.n) return a.done;
    return null;
  }

  /** Marks runs as in flight (caller holds the mutex); returns the function clearing them. */
  markInFlight(runs: ReadonlyArray<readonly [number, number]>): () => void {
    let resolve!: () => void;
    const done = new Promise<void>((r) => (resolve = r));
    for (const [c, n] of runs) this.allocating.set(c, { n, done });
    return () => {
      for (const [c] of runs) this.allocating.delete(c);
      resolve();
    };
  }

  /** Runs fn under the mutex once no allocation touching [first, last] is in flight. */
  async whenIdle<T>(first: number, last: number, fn: () => Promise<T>): Promise<T> {
    for (;;) {
      const release = await this.mutex.lock();
      let busy: Promise<void> | null = null;
      try {
        busy = this.allocationInFlight(first, last);
        if (!busy) return await fn();
      } finally {
        release();
      }
      await busy;
    }
  }

  // ---- in-flight data I/O -----------------------------------------------------------------

  beginData(): () => void {
    this.dataIo.start();
    let ended = false;
    return () => {
      if (ended) return;
      ended = true;
      this.dataIo.leave();
    };
  }

  private dataIdle(): Promise<void> {
    return this.dataIo.drain();
  }

  // ---- writeback --------------------------------------------------------------------------

  /** Writes all metadata back in crash-safe order (module comment). Caller holds the mutex. */
  async writeback(): Promise<void> {
    if (this.fatallyCorrupt) return;
    const rc = this.refcounts;
    let wrote = (await rc.cache.writeDirty()) > 0;
    const later = rc.dirtyTable.size > 0 || this.l2Cache.hasDirty() || this.dirtyL1.size > 0 || this.pendingFrees.length > 0;
    if (wrote && later) await this.file.flush();
    if (await rc.writeTable()) await this.file.flush();
    wrote = (await this.l2Cache.writeDirty()) > 0;
    if (wrote && (this.dirtyL1.size > 0 || this.pendingFrees.length > 0)) await this.file.flush();
    if (this.dirtyL1.size > 0) {
      await this.writeL1Entries([...this.dirtyL1]);
      this.dirtyL1.clear();
      if (this.pendingFrees.length > 0) await this.file.flush();
    }
    if (this.pendingFrees.length > 0) {
      await this.dataIdle();
      const frees = this.pendingFrees;
      this.pendingFrees = [];
      for (const f of frees) {
        while (!(await rc.update(f.first, f.count, -1))) {
          /* decrements never allocate */
        }
        for (let k = 0; k < f.count; k++) this.l2Cache.drop((f.first + k) * this.clusterSize);
      }
      await rc.cache.writeDirty();
    }
    this.l2Cache.evict();
    rc.cache.evict();
  }

  /** Whether writeback() would sync the file between its steps (the same tests as there). */
  writebackSyncs(): boolean {
    const rc = this.refcounts;
    const frees = this.pendingFrees.length > 0;
    const l2 = this.l2Cache.hasDirty();
    const l1 = this.dirtyL1.size > 0;
    if (rc.cache.hasDirty() && (rc.dirtyTable.size > 0 || l2 || l1 || frees)) return true;
    return rc.dirtyTable.size > 0 || (l2 && (l1 || frees)) || (l1 && frees);
  }

  /** Called at the end of each metadata operation: keeps the caches within bounds. */
  async maybeWriteback(): Promise<void> {
    if (this.l2Cache.needsWriteback() || this.refcounts.cache.needsWriteback() || this.pendingFrees.length > 4096) {
      await span('q2.writeback', -1, this.writeback());
    } else {
      this.l2Cache.evict();
      this.refcounts.cache.evict();
    }
  }

  private async writeL1Entries(idxs: number[]): Promise<void> {
    // whole 512-byte sectors of the table (QEMU writes L1 entries the same way)
    const sectors = new Set(idxs.map((i) => Math.floor(i / 64)));
    for (const s of [...sectors].sort((a, b) => a - b)) {
      const first = s * 64;
      const count = Math.min(64, this.l1.length - first);
      const buf = Buffer.alloc(count * 8);
      for (let k = 0; k < count; k++) encodeL1(buf, k, this.l1[first + k]!, this.l1Copied[first + k]!);
      this.checkOverlap(OL.ACTIVE_L1, this.header.l1TableOffset + first * 8, buf.length);
      await this.file.write(this.header.l1TableOffset + first * 8, buf);
    }
  }

  l1Buffer(): Buffer {
    const buf = Buffer.alloc(this.l1.length * 8);
    for (let i = 0; i < this.l1.length; i++) encodeL1(buf, i, this.l1[i]!, this.l1Copied[i]!);
    return buf;
  }

  /** Rewrites the whole first cluster from `header`. */
  async writeHeader(): Promise<void> {
    const bytes = serializeHeader(this.header);
    const buf = Buffer.alloc(this.clusterSize);
    bytes.copy(buf);
    this.checkOverlap(OL.MAIN_HEADER, 0, buf.length);
    await this.file.write(0, buf);
  }

  /** lazy_refcounts: mark the image dirty before the first metadata change (QEMU). */
  async markDirtyBit(): Promise<void> {
    if (!this.lazyRefcounts || this.dirtyBitWritten || !this.v3) return;
    this.header.incompatible |= INCOMPAT_DIRTY;
    await this.writeHeader();
    await this.file.flush();
    this.dirtyBitWritten = true;
  }

  /** Flushes metadata and clears the dirty bit (clean close). */
  async markClean(): Promise<void> {
    if (!(this.header.incompatible & INCOMPAT_DIRTY) || this.readOnly || this.fatallyCorrupt) return;
    await this.writeback();
    await this.file.flush();
    this.header.incompatible &= ~INCOMPAT_DIRTY;
    await this.writeHeader();
    await this.file.flush();
    this.dirtyBitWritten = false;
  }

  // ---- resize -------------------------------------------------------------------------

  /** Grows the L1 table to at least `entries` (exactly that many), moving it. Holds mutex. */
  async growL1(entries: number): Promise<void> {
    if (entries <= this.l1.length) return;
    if (entries * 8 > MAX_L1_BYTES) throw new BlockError('EFBIG', `qcow2: L1 table would exceed ${MAX_L1_BYTES} bytes`);
    await this.settleTruncate();
    // the new table is written from memory: what it points to must be in the file first
    await this.writeback();
    const bytes = entries * 8;
    const clusters = Math.ceil(bytes / this.clusterSize);
    const oldOffset = this.header.l1TableOffset;
    const oldClusters = Math.ceil((this.l1.length * 8) / this.clusterSize);
    const c = await this.refcounts.alloc(clusters);
    const off = c * this.clusterSize;
    // the old table stays the active one (for the overlap checks too) until the header moves
    const l1 = this.l1.concat(new Array<number>(entries - this.l1.length).fill(0));
    const copied = this.l1Copied.concat(new Array<boolean>(entries - this.l1Copied.length).fill(false));
    // the new table's refcounts must be in the file before the header points at it
    if ((await this.refcounts.cache.writeDirty()) > 0) await this.file.flush();
    await this.refcounts.writeTable();
    const buf = Buffer.alloc(entries * 8);
    for (let i = 0; i < entries; i++) encodeL1(buf, i, l1[i]!, copied[i]!);
    this.checkOverlap(OL.NONE, off, buf.length);
    await this.file.write(off, buf);
    await this.file.flush();
    this.header.l1TableOffset = off;
    this.header.l1Size = entries;
    this.l1 = l1;
    this.l1Copied = copied;
    await this.writeHeader();
    await this.file.flush();
    this.dirtyL1.clear();
    if (oldClusters > 0 && oldOffset !== 0) this.free(oldOffset / this.clusterSize, oldClusters);
  }

  async setSize(size: number): Promise<void> {
    await this.growL1(this.l1SizeFor(size));
    this.header.size = size;
    await this.writeHeader();
    await this.file.flush();
  }
}

export function roundUpTo(n: number, align: number): number {
  return Math.ceil(n / align) * align;
}
