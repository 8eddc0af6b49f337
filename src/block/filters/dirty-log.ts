// Filter driver "dirty-log": a crash-safe record, beside the image, of the granules written
// through the node since the last confirmed checkpoint (DRBD's activity log, for lockstep's
// pair). Every request that can change data (write, write-zeroes, discard) has its granules
// persisted as dirty in the log file *before* it is passed to `file`; reads, flushes and
// block status pass through. After a SIGKILL or power loss at any moment the log holds a
// superset of the granules that may differ from the last confirmed state, never a subset.
//
// Options: file (BlockdevRef), filename (the log file; created empty when missing, loaded
// when present), granularity (bytes per bit, a power of two in [512, 1 GiB]; default 65536,
// or the loaded log's), clear-interval-ms (default 1000), hot-bytes (default 0: confirmed
// granules are dropped only while the record covers more than this many bytes, in the
// manner of DRBD's activity-log extents: fewer new persists, a larger superset).
//
// Log file (all integers little-endian):
//   0   8  magic "LSDIRTY1"
//   8   4  format version (1)
//   12  4  header size (4096): the bitmap starts there
//   16  8  disk size in bytes
//   24  4  granularity in bytes
//   4096   ceil(bits / 8) bytes of bitmap, bit i = bit (i % 8) of byte i / 8: granule i is dirty
// The header is only ever written with the whole file (a temporary file, fdatasync, rename,
// directory fsync), so it is never torn. In place, the bitmap bytes only ever go from the
// file's bits to a superset of them (pwrite + fdatasync before the guarded request goes on):
// a torn pwrite leaves every bit either as it was or as intended, both supersets of what the
// requests that already went on needed. Bits are dropped only by rewriting the whole file
// the same crash-safe way (x-dirty-log-checkpoint lazily, x-dirty-log-clear at once).
//
// Costs: a granule already persisted costs a few bit operations and no I/O or await; first
// touches that arrive while a persist is running share the next one (one pwrite per run of
// bytes, one fdatasync). A checkpoint costs nothing but resetting an in-memory bitmap: the
// file is rewritten at most once per clear-interval-ms, keeping granules written since the
// last checkpoint call and those written since the previous rewrite (hot granules are kept
// so that they do not need a new persist right after every rewrite).

import { open, readFile, type FileHandle } from 'node:fs/promises';
import { makeCaps, type BlockDriver, type NodeImpl } from '../driver.js';
import { BlockError, InvalidArgumentError, StateError, errorMessage } from '../../errors.js';
import type { BlockNode } from '../node.js';
import { Bitmap, type ByteRange } from '../../util/bitmap.js';
import { replaceFileDurably } from '../../util/durable.js';

export const DIRTY_LOG_MAGIC = 'LSDIRTY1';
export const DIRTY_LOG_VERSION = 1;
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

function encodeLog(bitmap: Bitmap): Buffer {
  const buf = Buffer.alloc(DIRTY_LOG_HEADER_SIZE + bitmap.byteLength);
  buf.write(DIRTY_LOG_MAGIC, 0, 'latin1');
  buf.writeUInt32LE(DIRTY_LOG_VERSION, 8);
  buf.writeUInt32LE(DIRTY_LOG_HEADER_SIZE, 12);
  buf.writeBigUInt64LE(BigInt(bitmap.size), 16);
  buf.writeUInt32LE(bitmap.granularity, 24);
  bitmap.toBytes().copy(buf, DIRTY_LOG_HEADER_SIZE);
  return buf;
}

/** Parses a log file's content; errors name the file. */
export function decodeLog(path: string, buf: Buffer): Bitmap {
  const bad = (why: string): never => {
    throw new InvalidArgumentError(`'${path}' is not a valid dirty log: ${why}`);
  };
  if (buf.length < DIRTY_LOG_HEADER_SIZE) bad(`${buf.length} bytes, shorter than its header`);
  if (buf.toString('latin1', 0, 8) !== DIRTY_LOG_MAGIC) bad('bad magic');
  const version = buf.readUInt32LE(8);
  if (version !== DIRTY_LOG_VERSION) bad(`format version ${version} (this build reads ${DIRTY_LOG_VERSION})`);
  if (buf.readUInt32LE(12) !== DIRTY_LOG_HEADER_SIZE) bad(`header size ${buf.readUInt32LE(12)}`);
  const size = buf.readBigUInt64LE(16);
  if (size > BigInt(Number.MAX_SAFE_INTEGER)) bad(`disk size ${size}`);
  const granularity = buf.readUInt32LE(24);
  if (granularity < MIN_GRANULARITY || granularity > MAX_GRANULARITY || (granularity & (granularity - 1)) !== 0) bad(`granularity ${granularity}`);
  const bitmap = new Bitmap(Number(size), granularity);
  const expected = DIRTY_LOG_HEADER_SIZE + bitmap.byteLength;
  if (buf.length !== expected) bad(`${buf.length} bytes, expected ${expected} for a ${size}-byte disk`);
  bitmap.loadBytes(buf.subarray(DIRTY_LOG_HEADER_SIZE));
  return bitmap;
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
  return reportOf(decodeLog(path, buf));
}

/** First touches waiting for one persist: bit ranges [first, end). */
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

/** The per-node state of a dirty-log filter. */
export class DirtyLog {
  /** the record: every granule that may differ from the last confirmed state */
  private readonly mem: Bitmap;
  /** granules whose bit is durably set in the file at `path` (a subset of mem) */
  private readonly persisted: Bitmap;
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
    loaded: Bitmap,
    readonly clearIntervalMs: number,
    /** confirmed granules are only dropped while the record holds more than this many */
    private readonly hotGranules: number,
    private readonly onError: (msg: string) => void,
    /** flushes the guarded node (before granules are dropped) */
    private readonly flushData?: () => Promise<void>,
  ) {
    this.mem = loaded;
    const copy = (): Bitmap => {
      const b = new Bitmap(loaded.size, loaded.granularity);
      b.assign(loaded);
      return b;
    };
    this.persisted = copy();
    // what the file holds is unconfirmed until the first checkpoint call
    this.touched = copy();
    this.recent = new Bitmap(loaded.size, loaded.granularity);
  }

  /** Opens (or creates, empty) the log of a `size`-byte disk. */
  static async open(
    path: string,
    size: number,
    granularity: number | undefined,
    opts: { clearIntervalMs: number; hotBytes: number; flush?: () => Promise<void> },
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
    if (buf === null) {
      const empty = new Bitmap(size, granularity ?? DEFAULT_DIRTY_GRANULARITY);
      let fh: FileHandle;
      try {
        fh = await replaceFileDurably(path, encodeLog(empty), true);
      } catch (e) {
        throw new InvalidArgumentError(`Cannot create dirty log '${path}': ${errorMessage(e)}`);
      }
      return new DirtyLog(path, fh, empty, clearIntervalMs, hot(empty.granularity), onError, opts.flush);
    }
    const loaded = decodeLog(path, buf);
    if (loaded.size !== size) {
      throw new InvalidArgumentError(`Dirty log '${path}' is for a disk of ${loaded.size} bytes, but the node has ${size} bytes`);
    }
    if (granularity !== undefined && loaded.granularity !== granularity) {
      throw new InvalidArgumentError(`Dirty log '${path}' has granularity ${loaded.granularity}, not ${granularity}`);
    }
    let fh: FileHandle;
    try {
      fh = await open(path, 'r+');
    } catch (e) {
      throw new InvalidArgumentError(`Cannot open dirty log '${path}': ${errorMessage(e)}`);
    }
    return new DirtyLog(path, fh, loaded, clearIntervalMs, hot(loaded.granularity), onError, opts.flush);
  }

  get granularity(): number {
    return this.mem.granularity;
  }

  get size(): number {
    return this.mem.size;
  }

  report(): DirtyLogReport {
    return reportOf(this.mem);
  }

  /**
   * Marks [offset, offset+length) dirty. Returns null when every granule is persisted
   * already (the request may go on at once), or a promise that resolves once they are.
   */
  mark(offset: number, length: number): Promise<void> | null {
    if (length <= 0) return null;
    const [a, b] = this.mem.bitSpan(offset, length);
    this.touched.setBits(a, b, true);
    this.recent.setBits(a, b, true);
    let i = a;
    while (i < b && this.persisted.get(i)) i++;
    if (i === b) return null;
    if (this.closed) return Promise.reject(new BlockError('EIO', `dirty log '${this.path}' is closed`));
    this.mem.setBits(i, b, true);
    let batch = this.openBatch;
    if (!batch) {
      const created = (batch = this.openBatch = newBatch());
      this.enqueue(() => this.persist(created));
    }
    batch.ranges.push([i, b]);
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
      for (let k = 0; k < sorted.length; ) {
        const start = sorted[k]!;
        let end = start + 1;
        for (k++; k < sorted.length && sorted[k]! - end <= MERGE_GAP; k++) end = sorted[k]! + 1;
        // mem holds a superset of the file's bits: the bytes only gain bits
        const data = this.mem.toBytes(start, end);
        await this.fh.write(data, 0, data.length, DIRTY_LOG_HEADER_SIZE + start);
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

  /** Rewrites the file with the granules written since the last checkpoint or rewrite. */
  private async rewrite(all = false): Promise<void> {
    // Dropping a granule says its data is where it belongs: make the data durable first (a
    // qcow2 keeps new L2 entries in memory until a flush, so after a SIGKILL the disk could
    // lack writes the record no longer names). Writes arriving meanwhile are kept below.
    if (this.flushData && this.mem.count > 0 && (all || this.mem.count > this.hotGranules)) await this.flushData();
    const keep = new Bitmap(this.mem.size, this.mem.granularity);
    keep.assign(this.touched);
    keep.union(this.recent);
    this.recent.clearAll();
    this.lastRewrite = performance.now();
    if (keep.count === this.mem.count) return; // keep is a subset of mem: nothing to drop
    // a record within the hot budget stays whole: its granules need no new persist
    if (!all && this.mem.count <= this.hotGranules) return;
    // From here, a write into a dropped granule must persist it again (into the new file).
    this.mem.assign(keep);
    this.persisted.intersect(keep);
    let fh: FileHandle;
    try {
      fh = await replaceFileDurably(this.path, encodeLog(keep), true);
    } catch (e) {
      await this.recover();
      throw e;
    }
    const old = this.fh;
    this.fh = fh;
    this.persisted.union(keep);
    this.rewrites++;
    await old.close().catch(() => {});
    if (this.closed) await fh.close().catch(() => {});
  }

  /**
   * After a failed rewrite the file at `path` may be the old one or the new one (the rename
   * may have happened before the directory sync failed): writing the record in place over
   * either only drops bits the rewrite meant to drop. Until that works, persists fail.
   */
  private async recover(): Promise<void> {
    try {
      const fh = await open(this.path, 'r+');
      const data = this.mem.toBytes();
      await fh.write(data, 0, data.length, DIRTY_LOG_HEADER_SIZE);
      await fh.datasync();
      const old = this.fh;
      this.fh = fh;
      this.persisted.assign(this.mem);
      this.broken = null;
      await old.close().catch(() => {});
    } catch (e) {
      this.broken = BlockError.fromSystem(e, `dirty log '${this.path}'`);
    }
  }

  private scheduleClear(): void {
    if (this.clearTimer || this.closed) return;
    const wait = Math.max(0, this.lastRewrite + this.clearIntervalMs - performance.now());
    this.clearTimer = setTimeout(() => {
      this.clearTimer = null;
      if (this.closed) return;
      void this.enqueue(async () => {
        await this.rewrite();
        // confirmed granules kept as hot go at the next rewrite
        if (this.mem.count > Math.max(this.touched.count, this.hotGranules)) this.scheduleClear();
      }).catch((e: unknown) => this.onError(`dirty log '${this.path}': dropping confirmed granules failed: ${errorMessage(e)}`));
    }, wait);
    this.clearTimer.unref();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.clearTimer) clearTimeout(this.clearTimer);
    this.clearTimer = null;
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
    o.done();
    const file = (await ctx.openChild('file', fileOpt, { required: true }))!;
    const log = await DirtyLog.open(filename, file.getLength(), granularity, { clearIntervalMs: interval, hotBytes, flush: () => file.flush() }, (msg) => ctx.graph.emit('error-log', msg));
    const guarded = <T>(offset: number, length: number, op: () => Promise<T>): Promise<T> => {
      const p = log.mark(offset, length);
      const run = p === null ? op() : p.then(op);
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
      write: (offset, data, flags) => guarded(offset, data.length, () => file.write(offset, data, flags)),
      writeZeroes: (offset, length, flags) => guarded(offset, length, () => file.writeZeroes(offset, length, flags)),
      discard: (offset, length) => guarded(offset, length, () => file.discard(offset, length)),
      flush: () => file.flush(),
      info: () => ({ 'dirty-log': log.path, granularity: log.granularity, 'dirty-bytes': log.report()['dirty-bytes'] }),
      close: () => log.close(),
    };
    return impl;
  },
};
