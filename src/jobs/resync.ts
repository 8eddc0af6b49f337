// The resync job (x-blockdev-resync): copies exactly the listed byte ranges from `source` to
// `target`, in ascending order, with the copy engine's bounded workers, speed limit and
// error policy ('sync' mode: zero runs become write-zeroes that may unmap, or are skipped
// when `targetIsZero` says the target reads zeroes already; zeroes stored as data count as
// zero runs, cluster by cluster). Nothing outside the ranges is
// read or written. The pair supervisor uses it for incremental and full resyncs; a full
// sync is one range covering the disk.
//
// Resumption: `doneUpTo` is an offset below which every listed range has been copied (the
// first range's offset before anything is copied, the end of the last range when done).
// A resync cancelled and started again with the ranges above that offset ends with the
// same bytes as one uninterrupted run.
//
// Durable progress: with `flushBytes`, the target is flushed whenever that many bytes were
// copied since the last flush began, while the copy goes on (no drain), and
// `x-flushed-up-to` is the `doneUpTo` read when the last completed flush began: every
// listed byte below it is on the target's stable storage (a flush covers the writes that
// completed before it was sent). The job's last flush makes it the end of the last range.
//
// The engine's bitmap has the largest power-of-two granularity (at most 64 KiB, at least
// 512 bytes) that divides every range's offset and length (a range may end at the end of
// the disk), so that its bits cover exactly the ranges.

import { RESYNC_SOURCE_PERMS, RESYNC_TARGET_PERMS } from '../block/permissions.js';
import { InvalidArgumentError, StateError } from '../errors.js';
import type { BlockNode } from '../block/node.js';
import { Bitmap, type ByteRange } from '../util/bitmap.js';
import { BlockCopy, DEFAULT_CLUSTER_SIZE } from '../block/block-copy.js';
import { Job, type BlockJobInfo, type JobManager, type JobOptions, type JobType } from './job.js';
import { checkOnError } from './filter-insert.js';

export const RESYNC_MIN_ALIGNMENT = 512;

export interface ResyncOptions extends JobOptions {
  source: BlockNode;
  target: BlockNode;
  extents: readonly ByteRange[];
  /** the target reads zeroes everywhere: zero runs of the source are not written */
  targetIsZero?: boolean;
  /** flush the target after every this many bytes copied (0 or absent: only at the end) */
  flushBytes?: number;
}

/** Sorted, overlapping and touching ranges merged. */
export function normaliseExtents(extents: readonly ByteRange[]): ByteRange[] {
  const sorted = [...extents].sort((a, b) => a.offset - b.offset);
  const out: ByteRange[] = [];
  for (const e of sorted) {
    const last = out[out.length - 1];
    if (last && e.offset <= last.offset + last.length) last.length = Math.max(last.length, e.offset + e.length - last.offset);
    else out.push({ offset: e.offset, length: e.length });
  }
  return out;
}

/** Checks the ranges and returns the granularity that covers them exactly. */
export function resyncGranularity(extents: readonly ByteRange[], size: number): number {
  let g = DEFAULT_CLUSTER_SIZE;
  extents.forEach((e, i) => {
    const name = `extents[${i}] (offset ${e.offset}, length ${e.length})`;
    if (!Number.isSafeInteger(e.offset) || !Number.isSafeInteger(e.length) || e.offset < 0 || e.length <= 0) {
      throw new InvalidArgumentError(`${name}: offset must be non-negative and length positive`);
    }
    if (e.offset + e.length > size) throw new InvalidArgumentError(`${name} ends past the end of the disk (${size} bytes)`);
    const end = e.offset + e.length;
    if (e.offset % RESYNC_MIN_ALIGNMENT !== 0 || (end % RESYNC_MIN_ALIGNMENT !== 0 && end !== size)) {
      throw new InvalidArgumentError(`${name} is not aligned to ${RESYNC_MIN_ALIGNMENT} bytes (only a range ending at the end of the disk may end unaligned)`);
    }
    while (e.offset % g !== 0 || (end % g !== 0 && end !== size)) g /= 2;
  });
  return g;
}

export class ResyncJob extends Job {
  readonly type: JobType = 'resync';
  readonly source: BlockNode;
  readonly target: BlockNode;
  readonly bitmap: Bitmap;
  readonly copy: BlockCopy;
  private readonly firstOffset: number;
  private readonly lastEnd: number;
  private readonly flushBytes: number;
  /** every listed byte below this offset is copied and flushed on the target */
  private flushedUpTo: number;
  private sinceFlush = 0;
  private flushing: Promise<void> | null = null;
  private flushError: unknown = null;

  constructor(mgr: JobManager, opts: ResyncOptions, extents: readonly ByteRange[], granularity: number) {
    super(mgr, opts, opts.source);
    this.source = opts.source;
    this.target = opts.target;
    this.bitmap = new Bitmap(opts.source.getLength(), granularity);
    for (const e of extents) this.bitmap.setRange(e.offset, e.length);
    this.firstOffset = extents[0]?.offset ?? 0;
    const last = extents[extents.length - 1];
    this.lastEnd = last ? last.offset + last.length : 0;
    this.flushBytes = opts.flushBytes ?? 0;
    this.flushedUpTo = this.firstOffset;
    this.copy = new BlockCopy({ source: opts.source, target: opts.target, bitmap: this.bitmap, mode: 'sync', targetIsZero: opts.targetIsZero ?? false, detectZeroes: true });
  }

  /** Every listed byte below this offset has been copied. */
  get doneUpTo(): number {
    const bit = this.copy.lowestPendingBit();
    if (bit === -1) return this.lastEnd;
    return Math.max(this.firstOffset, bit * this.bitmap.granularity);
  }

  async start(): Promise<void> {
    try {
      this.source.checkNotBlocked();
      this.target.checkNotBlocked();
      this.block(this.source);
      this.block(this.target);
      // the source keeps serving its guest and the target may be written by replication
      // alongside (a live resync): only a resize would break the copy
      this.use(this.source, RESYNC_SOURCE_PERMS);
      this.use(this.target, RESYNC_TARGET_PERMS);
    } catch (e) {
      this.abandon();
      throw e;
    }
    this.created();
    this.startRunning();
  }

  /** Flushes the target behind the copy (one flush at a time); a failure fails the job. */
  private flushBehind(): void {
    if (this.flushing || this.flushError !== null) return;
    this.sinceFlush = 0;
    const upTo = this.doneUpTo;
    this.flushing = this.target
      .flush()
      .then(
        () => {
          this.flushedUpTo = Math.max(this.flushedUpTo, upTo);
        },
        (e: unknown) => {
          this.flushError = e;
        },
      )
      .finally(() => {
        this.flushing = null;
      });
  }

  protected async run(): Promise<void> {
    this.progressSetRemaining(this.copy.remainingBytes);
    if (this.flushBytes > 0) {
      this.copy.onCopied = (n) => {
        this.sinceFlush += n;
        if (this.sinceFlush >= this.flushBytes) this.flushBehind();
      };
    }
    try {
      await this.copy.run(this, async () => 'stop');
    } finally {
      this.copy.onCopied = null;
      await this.flushing;
    }
    if (this.flushError !== null) throw this.flushError;
    if (this.shouldStop) return;
    await this.target.flush();
    this.flushedUpTo = this.lastEnd;
  }

  private extra(): Record<string, number> {
    return {
      'x-done-up-to': this.doneUpTo,
      'x-flushed-up-to': this.flushedUpTo,
      'x-data-bytes': this.copy.dataBytes,
      'x-zeroed-bytes': this.copy.zeroedBytes,
      'x-skipped-zero-bytes': this.copy.skippedZeroBytes,
    };
  }

  override blockJobInfo(): BlockJobInfo {
    return { ...super.blockJobInfo(), ...this.extra() } as BlockJobInfo;
  }

  override blockEventData(): Record<string, unknown> {
    return { ...super.blockEventData(), ...this.extra() };
  }
}

/**
 * Starts a resync of `extents` (any order; overlaps merged) from `source` to `target`.
 * Throws InvalidArgumentError/StateError for bad arguments (nothing started then).
 */
export async function startResync(mgr: JobManager, opts: ResyncOptions): Promise<ResyncJob> {
  checkOnError('on-source-error', opts.onSourceError);
  checkOnError('on-target-error', opts.onTargetError);
  if (opts.flushBytes !== undefined && (!Number.isSafeInteger(opts.flushBytes) || opts.flushBytes < 0)) {
    throw new InvalidArgumentError(`Parameter 'flush-bytes' expects a non-negative integer, not ${opts.flushBytes}`);
  }
  if (opts.source === opts.target) throw new InvalidArgumentError('Source and target cannot be the same');
  if (opts.target.readOnly) throw new InvalidArgumentError(`Node '${opts.target.name}' is read-only`);
  if (opts.target.getLength() < opts.source.getLength()) {
    throw new InvalidArgumentError(
      `Source and target image have different sizes (${opts.source.getLength()} and ${opts.target.getLength()} bytes)`,
    );
  }
  if (opts.source.graph.reaches(opts.target, opts.source)) {
    throw new StateError(`'${opts.source.name}' is below '${opts.target.name}': a resync between them would read what it writes`);
  }
  const granularity = resyncGranularity(opts.extents, opts.source.getLength());
  const job = new ResyncJob(mgr, opts, normaliseExtents(opts.extents), granularity);
  await job.start();
  return job;
}
