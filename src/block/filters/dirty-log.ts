// Filter driver "dirty-log": a crash-safe record, beside the image, of the granules written
// through the node since the last confirmed checkpoint (DRBD's activity log, for lockstep's
// pair). Every request that can change data (write, write-zeroes, discard) has its granules
// covered as dirty in the log file *before* it is passed to `file`; reads, flushes and block
// status pass through. After a SIGKILL or power loss at any moment the log holds a superset of
// the granules that may differ from the last confirmed state, never a subset.
//
// Options: file (BlockdevRef), filename (the log file; created empty when missing, loaded
// when present), granularity (bytes per bit, a power of two in [512, 1 GiB]; default 65536,
// or the loaded log's), extent-size (the unit persisted before a write may go on: a power of
// two, a multiple of the granularity, at most 1 GiB; default the granularity, or the loaded
// log's), clear-interval-ms (default 1000), hot-bytes (default 0: confirmed granules are
// dropped only while the record covers more than this many bytes: fewer new persists, a
// larger superset).
//
// Two ways to cover a write, by extent-size:
// - equal to the granularity (format 1): each granule's bit is persisted (pwrite + fdatasync)
//   before the first write into it; the file is the record, exact at every instant.
// - larger (format 2, DRBD's activity-log extents): the coarse extent is persisted before the
//   first write into it; the fine granule bits are kept in memory and written with the whole
//   file (at the rewrite after checkpoints and at close). After a crash the record read back
//   is the file's granules plus every granule of every extent marked in it: a superset. With
//   random writes, most first writes land in an extent persisted already and go on with no
//   I/O; without a crash, resync copies the fine record (x-dirty-log-query).
//
// Log file (all integers little-endian):
//   0   8  magic "LSDIRTY1"
//   8   4  format version (1 or 2)
//   12  4  header size (4096): the granule bitmap starts there
//   16  8  disk size in bytes
//   24  4  granularity in bytes
//   28  4  format 2: extent size in bytes (format 1: zero)
//   4096   ceil(granules / 8) bytes of granule bitmap, bit i = bit (i % 8) of byte i / 8:
//          granule i is dirty
//   format 2 only, at 4096 + the granule bitmap's size rounded up to 4096 (its own page):
//          ceil(extents / 8) bytes of extent bitmap, bit j set: every granule of extent j
//          is dirty
// The header is only ever written with the whole file (a temporary file, fdatasync, rename,
// directory fsync), so it is never torn. In place, only the persisted bitmap (format 1: the
// granules; format 2: the extents) is written, and its bytes only ever go from the file's bits
// to a superset of them (pwrite + fdatasync before the guarded request goes on): a torn pwrite
// leaves every bit either as it was or as intended, both supersets of what the requests that
// already went on needed. Bits are dropped only by rewriting the whole file the same
// crash-safe way (x-dirty-log-checkpoint lazily, x-dirty-log-clear at once).
//
// Costs: a granule (format 2: an extent) already persisted costs a few bit operations and no
// I/O or await; first touches that arrive while a persist is running share the next one (one
// pwrite per run of bytes, one fdatasync). A checkpoint costs nothing but resetting an
// in-memory bitmap: the file is rewritten at most once per clear-interval-ms, keeping granules
// written since the last checkpoint call and those written since the previous rewrite (hot
// granules are kept so that they do not need a new persist right after every rewrite; in
// format 2 the extents written since the previous rewrite stay marked for the same reason).

import { open, readFile, type FileHandle } from 'node:fs/promises';
import { makeCaps, type BlockDriver, type NodeImpl } from '../driver.js';
import { BlockError, InvalidArgumentError, StateError, errorMessage } from '../../errors.js';
import type { BlockNode } from '../node.js';
import { Bitmap, type ByteRange } from '../../util/bitmap.js';
import { replaceFileDurably } from '../../util/durable.js';
import { span } from '../../util/trace.js';

export const DIRTY_LOG_MAGIC = 'LSDIRTY1';
/** format 1: granule bits persisted in place; format 2: extent bits persisted in place */
export const DIRTY_LOG_VERSION = 2;
export const DIRTY_LOG_HEADER_SIZE = 4096;
export const DEFAULT_DIRTY_GRANULARITY = 65536;
export const DEFAULT_CLEAR_INTERVAL_MS = 1000;
const MIN_GRANULARITY = 512;
const MAX_GRANULARITY = 1 << 30;
/** bitmap bytes closer than this are written by one pwrite */
const MERGE_GAP = 4096;

/** What x-dirty-log-query and x-dirty-log-read answer. */
export interface DirtyLogReport {
  granularity: number;
  'dirty-bytes': number;
  extents: ByteRange[];
}

export function checkDirtyGranularity(g: number): void {
  if (!Number.isSafeInteger(g) || g < MIN_GRANULARITY || g > MAX_GRANULARITY) {
    throw new InvalidArgumentError(`Parameter 'granularity' expects a value in range [512B, 1GB], not ${g}`);
  }
  if ((g & (g - 1)) !== 0) throw new InvalidArgumentError(`Parameter 'granularity' must be a power of 2, not ${g}`);
}

function checkExtentSize(e: number, granularity: number): void {
  if (!Number.isSafeInteger(e) || e < granularity || e > MAX_GRANULARITY || (e & (e - 1)) !== 0) {
    throw new InvalidArgumentError(`Parameter 'extent-size' must be a power of 2 in range [granularity (${granularity}), 1GB], not ${e}`);
  }
}

/** A log file's content: the granule bits, and in format 2 the extent bits. */
export interface DecodedLog {
  fine: Bitmap;
  /** null: format 1 (the extent is the granule) */
  extents: Bitmap | null;
}

/** Where the extent bitmap starts in a format 2 file. */
function extentOffset(fine: Bitmap): number {
  return DIRTY_LOG_HEADER_SIZE + Math.ceil(fine.byteLength / 4096) * 4096;
}

function encodeLog(fine: Bitmap, extents: Bitmap | null): Buffer {
  const extOff = extents ? extentOffset(fine) : 0;
  const buf = Buffer.alloc(extents ? extOff + extents.byteLength : DIRTY_LOG_HEADER_SIZE + fine.byteLength);
  buf.write(DIRTY_LOG_MAGIC, 0, 'latin1');
  buf.writeUInt32LE(extents ? 2 : 1, 8);
  buf.writeUInt32LE(DIRTY_LOG_HEADER_SIZE, 12);
  buf.writeBigUInt64LE(BigInt(fine.size), 16);
  buf.writeUInt32LE(fine.granularity, 24);
  buf.writeUInt32LE(extents ? extents.granularity : 0, 28);
  fine.toBytes().copy(buf, DIRTY_LOG_HEADER_SIZE);
  if (extents) extents.toBytes().copy(buf, extOff);
  return buf;
}

/** Parses a log file's content (format 1 or 2); errors name the file. */
export function decodeLog(path: string, buf: Buffer): DecodedLog {
  const bad = (why: string): never => {
    throw new InvalidArgumentError(`'${path}' is not a valid dirty log: ${why}`);
  };
  if (buf.length < DIRTY_LOG_HEADER_SIZE) bad(`${buf.length} bytes, shorter than its header`);
  if (buf.toString('latin1', 0, 8) !== DIRTY_LOG_MAGIC) bad('bad magic');
  const version = buf.readUInt32LE(8);
  if (version !== 1 && version !== 2) bad(`format version ${version} (this build reads 1 and 2)`);
  if (buf.readUInt32LE(12) !== DIRTY_LOG_HEADER_SIZE) bad(`header size ${buf.readUInt32LE(12)}`);
  const size = buf.readBigUInt64LE(16);
  if (size > BigInt(Number.MAX_SAFE_INTEGER)) bad(`disk size ${size}`);
  const granularity = buf.readUInt32LE(24);
  if (granularity < MIN_GRANULARITY || granularity > MAX_GRANULARITY || (granularity & (granularity - 1)) !== 0) bad(`granularity ${granularity}`);
  const fine = new Bitmap(Number(size), granularity);
  let extents: Bitmap | null = null;
  let expected = DIRTY_LOG_HEADER_SIZE + fine.byteLength;
  if (version === 2) {
    const e = buf.readUInt32LE(28);
    if (e <= granularity || e > MAX_GRANULARITY || (e & (e - 1)) !== 0) bad(`extent size ${e} with granularity ${granularity}`);
    extents = new Bitmap(Number(size), e);
    expected = extentOffset(fine) + extents.byteLength;
  }
  if (buf.length !== expected) bad(`${buf.length} bytes, expected ${expected} for a ${size}-byte disk`);
  fine.loadBytes(buf.subarray(DIRTY_LOG_HEADER_SIZE, DIRTY_LOG_HEADER_SIZE + fine.byteLength));
  if (extents) extents.loadBytes(buf.subarray(expected - extents.byteLength));
  return { fine, extents };
}

/** Sets, in `fine`, every granule of every extent set in `extents`. */
function expandInto(fine: Bitmap, extents: Bitmap): void {
  for (const r of extents.runs()) fine.setRange(r.offset, r.length);
}

/** The record a log file holds: its granules and every granule of its extents. */
export function recordOf(d: DecodedLog): Bitmap {
  const r = new Bitmap(d.fine.size, d.fine.granularity);
  r.assign(d.fine);
  if (d.extents) expandInto(r, d.extents);
  return r;
}

export function reportOf(bitmap: Bitmap): DirtyLogReport {
  return { granularity: bitmap.granularity, 'dirty-bytes': bitmap.dirtyBytes, extents: [...bitmap.runs()] };
}

/** x-dirty-log-read: the record in a log file no node has open. */
export async function readDirtyLogFile(path: string): Promise<DirtyLogReport> {
  let buf: Buffer;
  try {
    buf = await readFile(path);
  } catch (e) {
    throw new InvalidArgumentError(`Cannot read dirty log '${path}': ${errorMessage(e)}`);
  }
  return reportOf(recordOf(decodeLog(path, buf)));
}

/** First touches waiting for one persist: bit ranges [first, end) of the persisted unit. */
interface Batch {
  ranges: Array<[number, number]>;
  promise: Promise<void>;
  resolve(): void;
  reject(e: unknown): void;
}

function newBatch(): Batch {
  let resolve!: () => void;
  let reject!: (e: unknown) => void;
  const promise = new Promise<void>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  // a batch nobody waits for any more (the request was abandoned) must not be unhandled
  promise.catch(() => {});
  return { ranges: [], promise, resolve, reject };
}

function copyOf(b: Bitmap): Bitmap {
  const c = new Bitmap(b.size, b.granularity);
  c.assign(b);
  return c;
}

function sameBits(a: Bitmap, b: Bitmap): boolean {
  return a.count === b.count && a.toBytes().equals(b.toBytes());
}

/** The per-node state of a dirty-log filter. */
export class DirtyLog {
  /** the record: every granule that may differ from the last confirmed state */
  private readonly mem: Bitmap;
  /** the unit persisted in place before a write goes on: `mem` itself in format 1, the
   *  extents in format 2 (those set here are set in the file or about to be) */
  private readonly unitMem: Bitmap;
  /** units whose bit is durably set in the file at `path` (a subset of unitMem) */
  private readonly persisted: Bitmap;
  /** format 2: the granule bits the file at `path` holds (written with the whole file) */
  private readonly fileFine: Bitmap | null;
  /** granules written since the last checkpoint call (never dropped) */
  private readonly touched: Bitmap;
  /** granules written since the last rewrite (kept by the next one: hot granules) */
  private readonly recent: Bitmap;
  /** the batch new first touches join; it has not started yet */
  private openBatch: Batch | null = null;
  /** persists and rewrites run one at a time, in order */
  private queue: Promise<void> = Promise.resolve();
  private clearTimer: NodeJS.Timeout | null = null;
  private lastRewrite = 0;
  private closed = false;
  /** set when the file could not be brought back after a failed rewrite */
  private broken: BlockError | null = null;
  /** granules whose writes *completed* since the last takeWritten (null: not tracking); in
   *  memory only: a live resync's passes copy them again (completion, not the mark, because
   *  a copy that read a granule before a write to it landed must see it again) */
  private written: Bitmap | null = null;
  /** file rewrites done (for tests and info) */
  rewrites = 0;
  /** persists (pwrite + fdatasync) done */
  syncs = 0;

  private constructor(
    readonly path: string,
    private fh: FileHandle,
    loaded: DecodedLog,
    readonly clearIntervalMs: number,
    /** confirmed granules are only dropped while the record holds more than this many */
    private readonly hotGranules: number,
    private readonly onError: (msg: string) => void,
    /** flushes the guarded node (before granules are dropped) */
    private readonly flushData?: () => Promise<void>,
  ) {
    this.mem = recordOf(loaded);
    if (loaded.extents) {
      this.unitMem = copyOf(loaded.extents);
      this.fileFine = copyOf(loaded.fine);
    } else {
      this.unitMem = this.mem;
      this.fileFine = null;
    }
    this.persisted = copyOf(this.unitMem);
    // what the file holds is unconfirmed until the first checkpoint call
    this.touched = copyOf(this.mem);
    this.recent = new Bitmap(this.mem.size, this.mem.granularity);
  }

  /** Opens (or creates, empty) the log of a `size`-byte disk. */
  static async open(
    path: string,
    size: number,
    granularity: number | undefined,
    opts: { clearIntervalMs: number; hotBytes: number; extentSize?: number; flush?: () => Promise<void> },
    onError: (msg: string) => void,
  ): Promise<DirtyLog> {
    const { clearIntervalMs } = opts;
    const hot = (g: number): number => Math.floor(opts.hotBytes / g);
    let buf: Buffer | null = null;
    try {
      buf = await readFile(path);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw new InvalidArgumentError(`Cannot open dirty log '${path}': ${errorMessage(e)}`);
    }
    const extentsFor = (fine: Bitmap, e: number): Bitmap | null => (e === fine.granularity ? null : new Bitmap(fine.size, e));
    if (buf === null) {
      const fine = new Bitmap(size, granularity ?? DEFAULT_DIRTY_GRANULARITY);
      if (opts.extentSize !== undefined) checkExtentSize(opts.extentSize, fine.granularity);
      const empty: DecodedLog = { fine, extents: extentsFor(fine, opts.extentSize ?? fine.granularity) };
      let fh: FileHandle;
      try {
        fh = await replaceFileDurably(path, encodeLog(empty.fine, empty.extents), true);
      } catch (e) {
        throw new InvalidArgumentError(`Cannot create dirty log '${path}': ${errorMessage(e)}`);
      }
      return new DirtyLog(path, fh, empty, clearIntervalMs, hot(fine.granularity), onError, opts.flush);
    }
    let loaded = decodeLog(path, buf);
    const g = loaded.fine.granularity;
    if (loaded.fine.size !== size) {
      throw new InvalidArgumentError(`Dirty log '${path}' is for a disk of ${loaded.fine.size} bytes, but the node has ${size} bytes`);
    }
    if (granularity !== undefined && g !== granularity) {
      throw new InvalidArgumentError(`Dirty log '${path}' has granularity ${g}, not ${granularity}`);
    }
    if (opts.extentSize !== undefined) checkExtentSize(opts.extentSize, g);
    const loadedExtent = loaded.extents?.granularity ?? g;
    let fh: FileHandle;
    if (opts.extentSize !== undefined && opts.extentSize !== loadedExtent) {
      // another extent size (or format): the whole record, expanded, in a new file of the
      // asked format; the old file stays until the new one replaces it
      loaded = { fine: recordOf(loaded), extents: extentsFor(loaded.fine, opts.extentSize) };
      try {
        fh = await replaceFileDurably(path, encodeLog(loaded.fine, loaded.extents), true);
      } catch (e) {
        throw new InvalidArgumentError(`Cannot rewrite dirty log '${path}': ${errorMessage(e)}`);
      }
    } else {
      try {
        fh = await open(path, 'r+');
      } catch (e) {
        throw new InvalidArgumentError(`Cannot open dirty log '${path}': ${errorMessage(e)}`);
      }
    }
    return new DirtyLog(path, fh, loaded, clearIntervalMs, hot(g), onError, opts.flush);
  }

  get granularity(): number {
    return this.mem.granularity;
  }

  /** bytes per unit persisted before a first write (the granularity in format 1) */
  get extentSize(): number {
    return this.unitMem.granularity;
  }

  get size(): number {
    return this.mem.size;
  }

  report(): DirtyLogReport {
    return reportOf(this.mem);
  }

  /**
   * Marks [offset, offset+length) dirty. Returns null when every unit is persisted already
   * (the request may go on at once), or a promise that resolves once they are.
   */
  mark(offset: number, length: number): Promise<void> | null {
    if (length <= 0) return null;
    const [a, b] = this.mem.bitSpan(offset, length);
    this.touched.setBits(a, b, true);
    this.recent.setBits(a, b, true);
    // format 2: the fine bits are the in-memory record, persisted lazily with the whole file
    if (this.unitMem !== this.mem) this.mem.setBits(a, b, true);
    const [ua, ub] = this.unitMem.bitSpan(offset, length);
    let i = ua;
    while (i < ub && this.persisted.get(i)) i++;
    if (i === ub) return null;
    if (this.closed) return Promise.reject(new BlockError('EIO', `dirty log '${this.path}' is closed`));
    this.unitMem.setBits(i, ub, true);
    let batch = this.openBatch;
    if (!batch) {
      const created = (batch = this.openBatch = newBatch());
      this.enqueue(() => this.persist(created));
    }
    batch.ranges.push([i, ub]);
    return batch.promise;
  }

  /** A guarded request ended (done or failed): its granules count as written when tracking. */
  completed(offset: number, length: number): void {
    if (!this.written || length <= 0) return;
    const [a, b] = this.written.bitSpan(offset, length);
    this.written.setBits(a, b, true);
  }

  /** x-dirty-log-written: the granules written (requests completed) since the last call, or
   *  since tracking started; tracking starts at the first call and ends with `stop`. */
  takeWritten(stop: boolean): DirtyLogReport & { tracking: boolean } {
    const was = this.written;
    this.written = stop ? null : new Bitmap(this.mem.size, this.mem.granularity);
    const r = reportOf(was ?? new Bitmap(this.mem.size, this.mem.granularity));
    return { ...r, tracking: was !== null };
  }

  /** x-dirty-log-mark: persists the ranges as dirty. */
  async markExtents(extents: readonly ByteRange[]): Promise<void> {
    await Promise.all(extents.map((e) => this.mark(e.offset, e.length)));
  }

  /**
   * x-dirty-log-checkpoint: everything written before this call is confirmed. Nothing is
   * dropped now; a rewrite within clear-interval-ms drops what stays untouched.
   */
  checkpoint(): void {
    this.touched.clearAll();
    this.scheduleClear();
  }

  /** x-dirty-log-clear: drops everything written before this call; resolves once persisted. */
  async clear(): Promise<void> {
    this.touched.clearAll();
    this.recent.clearAll();
    await this.enqueue(() => this.rewrite(true));
  }

  private enqueue(op: () => Promise<void>): Promise<void> {
    const p = this.queue.then(op);
    this.queue = p.catch(() => {});
    return p;
  }

  /** Where the persisted unit's bitmap starts in the file. */
  private get unitOffset(): number {
    return this.fileFine ? extentOffset(this.mem) : DIRTY_LOG_HEADER_SIZE;
  }

  /** One group commit: the batch's bitmap bytes, then one fdatasync. */
  private async persist(batch: Batch): Promise<void> {
    if (this.openBatch === batch) this.openBatch = null;
    try {
      if (this.closed) throw new BlockError('EIO', `dirty log '${this.path}' is closed`);
      if (this.broken) await this.recover();
      if (this.broken) throw this.broken;
      const bytes = new Set<number>();
      for (const [a, b] of batch.ranges) for (let i = a >>> 3; i <= (b - 1) >>> 3; i++) bytes.add(i);
      const sorted = [...bytes].sort((x, y) => x - y);
      const base = this.unitOffset;
      for (let k = 0; k < sorted.length; ) {
        const start = sorted[k]!;
        let end = start + 1;
        for (k++; k < sorted.length && sorted[k]! - end <= MERGE_GAP; k++) end = sorted[k]! + 1;
        // unitMem holds a superset of the file's bits: the bytes only gain bits
        const data = this.unitMem.toBytes(start, end);
        await this.fh.write(data, 0, data.length, base + start);
      }
      await this.fh.datasync();
      this.syncs++;
      for (const [a, b] of batch.ranges) this.persisted.setBits(a, b, true);
      batch.resolve();
    } catch (e) {
      const err = e instanceof BlockError ? e : BlockError.fromSystem(e, `dirty log '${this.path}'`);
      batch.reject(err);
    }
  }

  /**
   * Rewrites the file with the granules written since the last checkpoint or rewrite (format
   * 2: also the extents written since the last rewrite; `exact`: none, the granules alone).
   */
  private async rewrite(all = false, exact = false): Promise<void> {
    // The interval counts from here, not from after the flush below: a checkpoint call during
    // a slow flush would otherwise schedule a second rewrite at once, whose hot set (the
    // granules written during the flush alone) dropped nearly every extent, and the next
    // writes all waited for new persists (issue 18: ~200 extents re-persisted per such pair).
    this.lastRewrite = performance.now();
    // Dropping a granule says its data is where it belongs: make the data durable first (a
    // qcow2 keeps new L2 entries in memory until a flush, so after a SIGKILL the disk could
    // lack writes the record no longer names). Writes arriving meanwhile are kept below.
    if (this.flushData && !exact && this.mem.count > 0 && (all || this.mem.count > this.hotGranules)) await this.flushData();
    const keep = new Bitmap(this.mem.size, this.mem.granularity);
    if (exact) keep.assign(this.mem);
    else {
      keep.assign(this.touched);
      keep.union(this.recent);
    }
    // format 2: the extents written since the last rewrite stay persisted (hot extents)
    let hotExtents: Bitmap | null = null;
    if (this.fileFine && !exact) {
      hotExtents = new Bitmap(this.mem.size, this.unitMem.granularity);
      for (const r of this.recent.runs()) hotExtents.setRange(r.offset, r.length);
    }
    if (!exact) this.recent.clearAll();
    const dropping = keep.count !== this.mem.count; // keep is a subset of mem
    if (this.fileFine) {
      // the file changes if a granule goes, the fine bits are stale, or an extent goes
      const ext = hotExtents ?? new Bitmap(this.mem.size, this.unitMem.granularity);
      const extentsChange = !sameBits(ext, this.persisted) || !sameBits(ext, this.unitMem);
      if (!dropping && !extentsChange && sameBits(keep, this.fileFine)) return;
    } else if (!dropping) return;
    // a record within the hot budget stays whole: its granules need no new persist
    if (!all && !exact && this.mem.count <= this.hotGranules) return;
    // From here, a write into a dropped granule (format 2: outside the kept extents) must
    // persist its unit again (into the new file).
    this.mem.assign(keep);
    if (this.fileFine) {
      const ext = hotExtents ?? new Bitmap(this.mem.size, this.unitMem.granularity);
      this.unitMem.assign(ext);
      // units set in both the old file and the new one cover writes whichever file survives
      this.persisted.intersect(ext);
    } else this.persisted.intersect(keep);
    // what the new file holds: marks arriving while it is written set units that only a
    // later persist puts there, so they must not count as persisted with it
    const inFile = this.fileFine ? copyOf(this.unitMem) : keep;
    let fh: FileHandle;
    try {
      fh = await replaceFileDurably(this.path, encodeLog(keep, this.fileFine ? inFile : null), true);
    } catch (e) {
      await this.recover();
      throw e;
    }
    const old = this.fh;
    this.fh = fh;
    if (this.fileFine) this.fileFine.assign(keep);
    this.persisted.union(inFile);
    this.rewrites++;
    await old.close().catch(() => {});
    if (this.closed) await fh.close().catch(() => {});
  }

  /**
   * After a failed rewrite the file at `path` may be the old one or the new one (the rename
   * may have happened before the directory sync failed): writing the record in place over
   * either only drops bits the rewrite meant to drop. In format 2 the granule bits go first
   * (and are synced) so that the file covers the record alone before its extent bits change.
   * Until that works, persists fail.
   */
  private async recover(): Promise<void> {
    try {
      // snapshots: bits set while this runs reach the file by their own persist
      const units = copyOf(this.unitMem);
      const fineBits = this.fileFine ? copyOf(this.mem) : units;
      const fh = await open(this.path, 'r+');
      const fine = fineBits.toBytes();
      await fh.write(fine, 0, fine.length, DIRTY_LOG_HEADER_SIZE);
      await fh.datasync();
      if (this.fileFine) {
        const ext = units.toBytes();
        await fh.write(ext, 0, ext.length, extentOffset(this.mem));
        await fh.datasync();
        this.fileFine.assign(fineBits);
      }
      const old = this.fh;
      this.fh = fh;
      this.persisted.assign(units);
      this.broken = null;
      await old.close().catch(() => {});
    } catch (e) {
      this.broken = BlockError.fromSystem(e, `dirty log '${this.path}'`);
    }
  }

  private scheduleClear(): void {
    if (this.clearTimer || this.closed || this.closing) return;
    const wait = Math.max(0, this.lastRewrite + this.clearIntervalMs - performance.now());
    this.clearTimer = setTimeout(() => {
      this.clearTimer = null;
      if (this.closed || this.closing) return;
      void this.enqueue(async () => {
        await this.rewrite();
        // confirmed granules kept as hot go at the next rewrite (format 2: so do the
        // extents kept as hot, and the fine bits written since reach the file)
        if (this.mem.count > Math.max(this.touched.count, this.hotGranules) || (this.fileFine && this.persisted.count > 0)) this.scheduleClear();
      }).catch((e: unknown) => this.onError(`dirty log '${this.path}': dropping confirmed granules failed: ${errorMessage(e)}`));
    }, wait);
    this.clearTimer.unref();
  }

  private closing: Promise<void> | null = null;

  close(): Promise<void> {
    this.closing ??= this.doClose();
    return this.closing;
  }

  private async doClose(): Promise<void> {
    if (this.clearTimer) clearTimeout(this.clearTimer);
    this.clearTimer = null;
    // format 2: the fine record replaces the extents, so that a clean reopen loads it exact
    // (a failure leaves the extents, a superset)
    if (this.fileFine && !this.broken) {
      await this.enqueue(() => this.rewrite(false, true)).catch((e: unknown) => this.onError(`dirty log '${this.path}': writing the record at close failed: ${errorMessage(e)}`));
    }
    this.closed = true;
    await this.queue;
    await this.fh.close().catch(() => {});
  }
}

export interface DirtyLogImpl extends NodeImpl {
  readonly log: DirtyLog;
}

/** The log of a dirty-log node. */
export function getDirtyLog(node: BlockNode): DirtyLog {
  if (node.driver !== dirtyLogDriver) throw new StateError(`Node '${node.name}' is not a dirty-log filter`);
  return (node.impl as DirtyLogImpl).log;
}

export const dirtyLogDriver: BlockDriver = {
  name: 'dirty-log',
  kind: 'filter',
  async open(ctx, o): Promise<NodeImpl> {
    const fileOpt = o.raw('file');
    const filename = o.string('filename', true);
    if (filename === '') throw new InvalidArgumentError(`Parameter 'filename' must name the dirty log file`);
    const granularity = o.size('granularity');
    if (granularity !== undefined) checkDirtyGranularity(granularity);
    const interval = o.uint('clear-interval-ms') ?? DEFAULT_CLEAR_INTERVAL_MS;
    const hotBytes = o.size('hot-bytes') ?? 0;
    const extentSize = o.size('extent-size');
    o.done();
    const file = (await ctx.openChild('file', fileOpt, { required: true }))!;
    const log = await DirtyLog.open(filename, file.getLength(), granularity, { clearIntervalMs: interval, hotBytes, extentSize, flush: () => file.flush() }, (msg) => ctx.graph.emit('error-log', msg));
    const guarded = <T>(offset: number, length: number, op: () => Promise<T>): Promise<T> => {
      const p = log.mark(offset, length);
      const run = p === null ? op() : span('dlog.persist', offset, p).then(op);
      // noted at completion whatever the outcome (a failed write may have changed part of it)
      return run.finally(() => log.completed(offset, length));
    };
    const impl: DirtyLogImpl = {
      log,
      caps: makeCaps({
        requestAlignment: 1,
        fua: true,
        writeZeroes: true,
        discard: true,
        filter: true,
      }),
      get filename() {
        return file.filename;
      },
      getLength: () => file.getLength(),
      read: (offset, length) => file.read(offset, length),
      // straight to the child: a copy reading through here fills its own buffer
      readInto: (offset, buf) => file.readInto(offset, buf),
      write: (offset, data, flags) => guarded(offset, data.length, () => file.write(offset, data, flags)),
      writeZeroes: (offset, length, flags) => guarded(offset, length, () => file.writeZeroes(offset, length, flags)),
      discard: (offset, length) => guarded(offset, length, () => file.discard(offset, length)),
      flush: () => file.flush(),
      info: () => ({ 'dirty-log': log.path, granularity: log.granularity, ...(log.extentSize !== log.granularity ? { 'extent-size': log.extentSize } : {}), 'dirty-bytes': log.report()['dirty-bytes'] }),
      close: () => log.close(),
    };
    return impl;
  },
};
