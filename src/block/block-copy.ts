// The copy engine shared by copy-before-write, backup, mirror, commit and resync. It sits in
// block/ (not jobs/) so that the copy-before-write filter and the jobs both use it without an
// import running upwards; it knows a job only through CopyJobHooks. It copies the ranges whose
// bit is set in a bitmap from `source` to `target` at the same offsets, with bounded workers,
// the job's speed limit and its error policy.
//
// Two modes:
// - 'snapshot' (backup, copy-before-write): a set bit means "old data not copied yet". The
//   bit is cleared after the copy landed, so a writer that finds the bit set (or the
//   cluster in flight) waits for the copy before it overwrites the source. Zero content is
//   written as allocated zeroes (write-zeroes without may-unmap) so that it shadows what
//   lies below the target.
// - 'sync' (mirror, commit): a set bit means "dirty, copy again". The bit is cleared before
//   the source is read, so a write that lands during the copy sets it again (its filter
//   marks dirty after the write completes) and the range is copied once more. Zero runs
//   (by the block status of the source's chain) become write-zeroes that may unmap,
//   skipped when the target already reads zeroes there.
// Copies of overlapping clusters never run concurrently (the in-flight map), which keeps
// the target's writes in order.

import { BlockError } from '../errors.js';
import type { BlockNode } from './node.js';
import type { Bitmap } from '../util/bitmap.js';
import { chainStatus } from './chain.js';

export const DEFAULT_CLUSTER_SIZE = 64 * 1024;
/** Largest single copy request. */
export const MAX_CHUNK = 4 * 1024 * 1024;
export const DEFAULT_WORKERS = 4;
/** Largest read of one sync-mode copy between two looks at the pacer. */
const SYNC_READ_PIECE = 1024 * 1024;

/** A failed copy, with the side that failed (for on-source-error / on-target-error). */
export class CopyFailure extends Error {
  override name = 'CopyFailure';
  constructor(
    readonly error: BlockError,
    readonly isRead: boolean,
  ) {
    super(error.message, { cause: error });
  }
}

function asBlockError(e: unknown): BlockError {
  return e instanceof BlockError ? e : BlockError.fromSystem(e);
}

const ZEROES = Buffer.alloc(64 * 1024);
export function isZeroBuffer(b: Buffer): boolean {
  for (let pos = 0; pos < b.length; pos += ZEROES.length) {
    const n = Math.min(ZEROES.length, b.length - pos);
    if (!b.subarray(pos, pos + n).equals(ZEROES.subarray(0, n))) return false;
  }
  return true;
}

/** What a copy failure makes the loop do: the job's on-error policy decides (jobs/job.ts). */
export type ErrorAction = 'report' | 'ignore' | 'stop';

/** What the background loop needs from its job (Job implements it). */
export interface CopyJobHooks {
  readonly shouldStop: boolean;
  pausePoint(beforePause?: () => Promise<void>): Promise<void>;
  rateLimit(bytes: number): Promise<void>;
  errorAction(err: BlockError, isRead: boolean): ErrorAction;
  progressAdd(bytes: number): void;
  progressSetRemaining(bytes: number): void;
}

export interface BlockCopyOptions {
  source: BlockNode;
  target: BlockNode;
  bitmap: Bitmap;
  mode: 'snapshot' | 'sync';
  /**
   * snapshot mode: after a copy lands in the target, wait for the target's overlapping
   * in-flight requests (readers that may have looked below the target before the copy
   * landed) before the source may change. Needed when the source is in the target's
   * backing chain (fleecing, replication's hidden disk).
   */
  fleecing?: boolean;
  workers?: number;
  /**
   * sync mode: the target is known to read zeroes everywhere (just created): zero runs of
   * the source are skipped without asking the target.
   */
  targetIsZero?: boolean;
  /**
   * sync mode: data runs are split at cluster boundaries into zero and non-zero pieces, so
   * that zeroes stored as data are not written as data (resync; mirror keeps QEMU's way).
   */
  detectZeroes?: boolean;
}

export type IdleDecision = 'continue' | 'stop';

export class BlockCopy {
  readonly source: BlockNode;
  readonly target: BlockNode;
  readonly bitmap: Bitmap;
  readonly mode: 'snapshot' | 'sync';
  private readonly fleecing: boolean;
  workers: number;
  /** bit index -> the copy in flight for it */
  private readonly inflight = new Map<number, Promise<void>>();
  private inflightBytes = 0;
  /** bytes copied so far (both the background loop and copy-before-write) */
  copiedBytes = 0;
  /** sync mode: bytes written as data, as write-zeroes, and zero bytes not written at all */
  dataBytes = 0;
  zeroedBytes = 0;
  skippedZeroBytes = 0;
  private readonly targetIsZero: boolean;
  private readonly detectZeroes: boolean;
  /** called after each successful copy with its length */
  onCopied: ((bytes: number) => void) | null = null;
  /**
   * read buffers of SYNC_READ_PIECE bytes, reused once their write completed (a new 1 MiB
   * buffer per read kept the garbage collector busy: issues 18 and 14)
   */
  private readonly buffers: Buffer[] = [];

  constructor(opts: BlockCopyOptions) {
    this.source = opts.source;
    this.target = opts.target;
    this.bitmap = opts.bitmap;
    this.mode = opts.mode;
    this.fleecing = opts.fleecing ?? false;
    this.workers = opts.workers ?? DEFAULT_WORKERS;
    this.targetIsZero = opts.targetIsZero ?? false;
    this.detectZeroes = opts.detectZeroes ?? false;
  }

  get clusterSize(): number {
    return this.bitmap.granularity;
  }

  get inFlight(): number {
    return this.inflight.size;
  }

  /** Bytes still to copy: set bits plus copies in flight. */
  get remainingBytes(): number {
    return this.bitmap.dirtyBytes + this.inflightBytes;
  }

  /** The first bit still to copy or in flight, or -1 when none (a resume point). */
  lowestPendingBit(): number {
    let low = this.bitmap.nextSet(0);
    for (const i of this.inflight.keys()) if (low === -1 || i < low) low = i;
    return low;
  }

  /** Waits for every copy in flight (their failures are the copier's business). */
  async drain(): Promise<void> {
    while (this.inflight.size > 0) await Promise.allSettled([...new Set(this.inflight.values())]);
  }

  // ---- copy-before-write -------------------------------------------------------------------

  /**
   * Snapshot mode: makes sure every cluster overlapping [offset, offset+length) holds its
   * old content in the target. Copies the clusters whose bit is set, waits for copies of
   * them already in flight, and throws the copy's BlockError when it fails (the caller
   * then fails the incoming write and leaves the source unchanged).
   *
   * At most `workers` copies of this call run at once, and the walk gives the event loop
   * its turn (the graph's pacer) between them: a request over the whole disk costs memory
   * and loop time of a few chunks at a time, never of the whole range.
   *
   * `zeroing`: the request writes zeroes. Clusters not copied yet that read zeroes now are
   * left alone, their bits set: a set bit means the source still holds the content of the
   * bitmap's reset, so that content is zero and zeroes over it change nothing to save (a
   * later write of data copies them then). A zero write over never-written space then costs
   * a block-status call, not an allocated zero cluster in the target per cluster.
   */
  async copyBeforeWrite(offset: number, length: number, zeroing = false): Promise<void> {
    const [first, end] = this.bitmap.bitSpan(offset, length);
    const maxBits = Math.max(1, Math.floor(MAX_CHUNK / this.clusterSize));
    const pacer = this.source.graph.pacer;
    for (;;) {
      const others = new Set<Promise<void>>();
      const mine = new Set<Promise<void>>();
      let failure: unknown = null;
      let started = false;
      for (let i = first; i < end && failure === null; ) {
        const p = this.inflight.get(i);
        if (p) {
          others.add(p);
          i++;
          continue;
        }
        if (!this.bitmap.get(i)) {
          const n = this.bitmap.nextSet(i + 1);
          i = n === -1 || n > end ? end : n;
          continue;
        }
        // zeroing: how many clusters from i this copy may take (up to the end of the data)
        let most = maxBits;
        if (zeroing) {
          const run = await this.zeroRun(i, end);
          if (run.zero) {
            // bits that changed during the look need no copy either: a bit cleared was
            // copied, a copy started reads the zeroes this request leaves
            i += run.bits;
            continue;
          }
          most = Math.min(most, run.bits);
        }
        if (mine.size >= this.workers || started) {
          while (mine.size >= this.workers) await Promise.race(mine);
          await pacer.pace();
          // the bits may have changed meanwhile: look at bit i again
          if (this.inflight.has(i) || !this.bitmap.get(i) || failure !== null) continue;
        }
        let j = i + 1;
        while (j < end && j - i < most && this.bitmap.get(j) && !this.inflight.has(j)) j++;
        const t: Promise<void> = this.copyBits(i, j)
          .catch((e: unknown) => {
            failure ??= e;
          })
          .finally(() => mine.delete(t));
        mine.add(t);
        started = true;
        i = j;
      }
      await Promise.all(mine);
      await Promise.allSettled(others);
      if (failure !== null) throw failure instanceof CopyFailure ? failure.error : asBlockError(failure);
      if (!started && others.size === 0) return;
      // A copy someone else started may have failed: its bits are still set; look again.
    }
  }

  /** Whether the clusters from bit `first` (set, before `end`) read zeroes whole in the
   *  source's chain, and how many of them do (zero) or hold data (not zero; at least 1). */
  private async zeroRun(first: number, end: number): Promise<{ zero: boolean; bits: number }> {
    let last = first + 1;
    while (last < end && this.bitmap.get(last) && !this.inflight.has(last)) last++;
    const { offset, length } = this.bitmap.byteRange(first, last);
    let st: { zero: boolean; length: number };
    try {
      st = await this.zeroStatus(this.source, offset, length);
    } catch {
      return { zero: false, bits: last - first }; // unknown: copy as for any write
    }
    if (st.length >= length) return { zero: st.zero, bits: last - first };
    const cs = this.clusterSize;
    // whole clusters of zeroes only; a cluster with any data is copied
    if (st.zero) return st.length >= cs ? { zero: true, bits: Math.floor(st.length / cs) } : { zero: false, bits: 1 };
    return { zero: false, bits: Math.max(1, Math.ceil(st.length / cs)) };
  }

  // ---- one copy -----------------------------------------------------------------------------

  /** Copies bits [first, end) now; registers them in flight synchronously. */
  copyBits(first: number, end: number): Promise<void> {
    const { offset, length } = this.bitmap.byteRange(first, end);
    if (this.mode === 'sync') this.bitmap.setBits(first, end, false);
    this.inflightBytes += length;
    const run = async (): Promise<void> => {
      try {
        if (this.mode === 'snapshot') await this.copySnapshot(offset, length);
        else await this.copySync(offset, length);
      } catch (e) {
        // sync mode: the range is still dirty
        if (this.mode === 'sync') this.bitmap.setBits(first, end, true);
        throw e;
      } finally {
        this.inflightBytes -= length;
      }
      if (this.mode === 'snapshot') this.bitmap.setBits(first, end, false);
      this.copiedBytes += length;
      this.onCopied?.(length);
    };
    const p: Promise<void> = run().finally(() => {
      for (let i = first; i < end; i++) if (this.inflight.get(i) === p) this.inflight.delete(i);
    });
    for (let i = first; i < end; i++) this.inflight.set(i, p);
    return p;
  }

  private async readSource(offset: number, length: number): Promise<Buffer> {
    try {
      return await this.source.read(offset, length);
    } catch (e) {
      throw new CopyFailure(asBlockError(e), true);
    }
  }

  private async readSourceInto(offset: number, buf: Buffer): Promise<void> {
    try {
      await this.source.readInto(offset, buf);
    } catch (e) {
      throw new CopyFailure(asBlockError(e), true);
    }
  }

  private async targetOp(op: () => Promise<void>): Promise<void> {
    try {
      await op();
    } catch (e) {
      throw new CopyFailure(asBlockError(e), false);
    }
  }

  /**
   * Copies the old content of [offset, offset+length) into the target. Ranges the source's
   * block status calls zero are not read: they become allocated zeroes in the target at
   * once (a never-written region costs metadata only). Data is read and, when it reads as
   * zeroes all the same, written as zeroes too. Zeroes are written allocated (no unmap):
   * they must shadow what lies below the target.
   */
  private async copySnapshot(offset: number, length: number): Promise<void> {
    const end = offset + length;
    const status = async (pos: number): Promise<{ zero: boolean; length: number }> => {
      try {
        return await this.zeroStatus(this.source, pos, end - pos);
      } catch (e) {
        throw new CopyFailure(asBlockError(e), true);
      }
    };
    let st = await status(offset);
    for (let pos = offset; pos < end; ) {
      if (st.zero) {
        const n = st.length;
        await this.targetOp(() => this.target.writeZeroes(pos, n));
        pos += n;
        if (pos < end) st = await status(pos);
        continue;
      }
      // one read for the whole run of data (a fragmented image answers cluster by cluster)
      let runEnd = pos + st.length;
      while (runEnd < end) {
        st = await status(runEnd);
        if (st.zero) break;
        runEnd += st.length;
      }
      // in pieces, each read into a reused buffer: a new buffer per copy (up to MAX_CHUNK)
      // was external memory the GC counted until its next full collection, and saving a
      // written disk's old content started a major GC every few tens of MB (issue 14)
      for (let at = pos; at < runEnd; ) {
        const n = Math.min(runEnd - at, SYNC_READ_PIECE);
        const buf = this.buffers.pop() ?? Buffer.allocUnsafe(SYNC_READ_PIECE);
        try {
          const data = buf.subarray(0, n);
          await this.readSourceInto(at, data);
          const from = at;
          if (isZeroBuffer(data)) await this.targetOp(() => this.target.writeZeroes(from, n));
          else await this.targetOp(() => this.target.write(from, data));
        } finally {
          // the target is done with it once its write resolved (or failed)
          if (this.buffers.length < this.workers) this.buffers.push(buf);
        }
        at += n;
      }
      pos = runEnd;
    }
    if (this.fleecing) {
      const r = await this.target.tracker.begin(offset, length, 'serialising');
      this.target.tracker.end(r);
    }
  }

  /**
   * Whether [offset, ...) of the source reads as zeroes, asked of its whole chain: a range
   * the source leaves unallocated is answered by the layers below (QEMU's status "above"),
   * so that the zero clusters of a lower layer (replication's hidden disk under active)
   * are never read and scanned as data. The bytes written are the same as after a read.
   */
  private async zeroStatus(node: BlockNode, offset: number, length: number): Promise<{ zero: boolean; length: number }> {
    if (!node.caps.blockStatus && !node.caps.filter) return { zero: false, length };
    const s = await chainStatus(node, offset, length);
    return { zero: s.zero, length: Math.min(s.length, length) };
  }

  /**
   * Whether the target's own layer reads zeroes there. Its backing is not asked: zeroes
   * that only a backing file shows are written all the same, so that the target's
   * allocation map stays as it was (a zero cluster, not a hole onto the backing).
   */
  private async targetZeroStatus(offset: number, length: number): Promise<{ zero: boolean; length: number }> {
    const node = this.target;
    if (!node.caps.blockStatus && !node.caps.filter) return { zero: false, length };
    const s = await node.blockStatus(offset, length);
    // An unallocated range of a node with a backing file reads what the backing holds.
    const zero = s.zero && (s.allocated || node.backing === null);
    return { zero, length: Math.min(s.length, length) };
  }

  /** Zeroes into the target, skipped where it reads zeroes already. */
  private async copyZeroes(pos: number, n: number): Promise<void> {
    if (this.targetIsZero) {
      this.skippedZeroBytes += n;
      return;
    }
    let targetZero = false;
    try {
      const t = await this.targetZeroStatus(pos, n);
      targetZero = t.zero && t.length >= n;
    } catch {
      targetZero = false; // unknown: write the zeroes
    }
    if (targetZero) this.skippedZeroBytes += n;
    else {
      await this.targetOp(() => this.target.writeZeroes(pos, n, { mayUnmap: true }));
      this.zeroedBytes += n;
    }
  }

  private async writeData(pos: number, data: Buffer): Promise<void> {
    await this.targetOp(() => this.target.write(pos, data));
    this.dataBytes += data.length;
  }

  /** Writes `data` at `pos` with its zero clusters as zeroes (detectZeroes). */
  private async writeSplit(pos: number, data: Buffer): Promise<void> {
    const g = this.clusterSize;
    const pieceEnd = (at: number): number => Math.min(data.length, Math.floor((pos + at) / g + 1) * g - pos);
    for (let at = 0; at < data.length; ) {
      const zero = isZeroBuffer(data.subarray(at, pieceEnd(at)));
      let end = pieceEnd(at);
      while (end < data.length && isZeroBuffer(data.subarray(end, pieceEnd(end))) === zero) end = pieceEnd(end);
      if (zero) await this.copyZeroes(pos + at, end - at);
      else await this.writeData(pos + at, data.subarray(at, end));
      at = end;
    }
  }

  private async copySync(offset: number, length: number): Promise<void> {
    const end = offset + length;
    const pacer = this.source.graph.pacer;
    for (let pos = offset; pos < end; ) {
      // a source without block status (the pair's quorum) is read and scanned in full: in
      // pieces, the event loop getting its turn between them (issue 14)
      if (pos > offset) await pacer.pace();
      let st: { zero: boolean; length: number };
      try {
        st = await this.zeroStatus(this.source, pos, end - pos);
      } catch (e) {
        throw new CopyFailure(asBlockError(e), true);
      }
      const n = st.zero ? st.length : Math.min(st.length, SYNC_READ_PIECE);
      if (st.zero) {
        await this.copyZeroes(pos, n);
        pos += n;
        continue;
      }
      const buf = this.buffers.pop() ?? Buffer.allocUnsafe(SYNC_READ_PIECE);
      try {
        const data = buf.subarray(0, n);
        await this.readSourceInto(pos, data);
        // Without block status a hole reads as data: zero buffers still become zero writes.
        if (isZeroBuffer(data)) await this.copyZeroes(pos, n);
        else if (this.detectZeroes) await this.writeSplit(pos, data);
        else await this.writeData(pos, data);
      } finally {
        // the target is done with it once its write resolved (or failed)
        if (this.buffers.length < this.workers) this.buffers.push(buf);
      }
      pos += n;
    }
  }

  // ---- the background loop ------------------------------------------------------------------

  /**
   * Copies every set bit with at most `workers` copies in flight, under the job's pause
   * points, speed limit and error policy. When nothing is left (no set bit, nothing in
   * flight) it asks `onIdle` whether to stop or wait for more (mirror after READY).
   * Returns normally when done or cancelled; throws the BlockError of a copy whose error
   * policy says 'report'.
   */
  async run(job: CopyJobHooks, onIdle: () => Promise<IdleDecision>): Promise<void> {
    const active = new Set<Promise<void>>();
    let fatal: BlockError | null = null;
    let scanFrom = 0;
    const waitAll = async (): Promise<void> => {
      await Promise.allSettled([...active]);
    };
    const maxBits = Math.max(1, Math.floor(MAX_CHUNK / this.clusterSize));
    try {
      for (;;) {
        if (fatal) throw fatal;
        await job.pausePoint(waitAll);
        if (job.shouldStop) break;
        await this.source.graph.pacer.pace();
        if (fatal) throw fatal;
        let i = this.bitmap.nextSet(scanFrom);
        while (i !== -1 && this.inflight.has(i)) i = this.bitmap.nextSet(i + 1);
        if (i === -1) {
          if (scanFrom > 0) {
            scanFrom = 0;
            continue;
          }
          if (active.size > 0) {
            await Promise.race(active);
            continue;
          }
          if (this.inflight.size > 0) {
            // copies started by copy-before-write
            await Promise.allSettled([...new Set(this.inflight.values())]);
            continue;
          }
          job.progressSetRemaining(this.remainingBytes);
          if ((await onIdle()) === 'stop') break;
          continue;
        }
        let j = i + 1;
        while (j < this.bitmap.bits && j - i < maxBits && this.bitmap.get(j) && !this.inflight.has(j)) j++;
        const { length } = this.bitmap.byteRange(i, j);
        await job.rateLimit(length);
        if (job.shouldStop) break;
        // the bits may have changed while we slept
        if (!this.bitmap.get(i) || this.inflight.has(i)) continue;
        for (let k = i + 1; k < j; k++) {
          if (!this.bitmap.get(k) || this.inflight.has(k)) {
            j = k;
            break;
          }
        }
        const p = this.copyBits(i, j).then(
          () => {
            job.progressAdd(this.bitmap.byteRange(i, j).length);
            job.progressSetRemaining(this.remainingBytes);
          },
          (e: unknown) => {
            const f = e instanceof CopyFailure ? e : new CopyFailure(asBlockError(e), false);
            // snapshot mode keeps the bits set on failure; sync mode set them again
            const action = job.errorAction(f.error, f.isRead);
            if (action === 'report' && !fatal) fatal = f.error;
          },
        );
        const tracked: Promise<void> = p.finally(() => active.delete(tracked));
        active.add(tracked);
        scanFrom = j;
        job.progressSetRemaining(this.remainingBytes);
        while (active.size >= this.workers) await Promise.race(active);
      }
    } finally {
      await waitAll();
    }
    if (fatal) throw fatal;
  }
}
