// The mirror job, and the engine of active commit (in QEMU active commit is a mirror too).
//
// A filter (mirror_top / commit_top) goes above the source and marks every write dirty in
// the job's bitmap; the copy engine ('sync' mode) copies dirty ranges from the source to the
// target until nothing is dirty, then the job is READY and keeps copying new writes.
//   complete  - the job converges once more with the source's writers held, then pivots:
//               every parent of the source (through the filter) points at the target
//   cancel    - before READY, or with force: the job ends cancelled, the graph as it was;
//               after READY without force: the job converges with writers held and ends
//               successfully without pivoting (the target equals the source at that moment)
// Initial dirty ranges: sync=full everything, sync=top what the source's own layer has
// allocated, sync=none nothing; active commit: what any layer above the base allocated.
// Zero runs are written as write-zeroes that may unmap, skipped where the target already
// reads zeroes.

import { INTERMEDIATE_PERMS, MIRROR_SOURCE_PERMS, MIRROR_TARGET_PERMS, activeCommitBasePerms } from '../block/permissions.js';
import { BlockError, InvalidArgumentError, StateError } from '../errors.js';
import type { BlockNode } from '../block/node.js';
import { getJobTop, type JobTopState } from '../block/filters/job-top.js';
import { Bitmap } from '../util/bitmap.js';
import { BlockCopy, DEFAULT_CLUSTER_SIZE, type IdleDecision } from '../block/block-copy.js';
import { Job, type JobManager, type JobOptions, type JobType } from './job.js';
import { checkOnError, insertFilterDrained } from './filter-insert.js';

export type MirrorSync = 'full' | 'top' | 'none';

export interface MirrorOptions extends JobOptions {
  source: BlockNode;
  target: BlockNode;
  sync: MirrorSync;
  /** only 'existing' (the target node is given); QEMU's default 'absolute-paths' creates an image */
  mode?: 'existing' | 'absolute-paths';
  /** dirty bitmap granularity: a power of two in [512, 64 MiB]; default 64 KiB */
  granularity?: number;
  /** complete by itself once converged (replication's failover commit) */
  autoComplete?: boolean;
  /**
   * Bytes (> 0): flush the target when the copy starts and after every that many bytes
   * copied, one flush at a time, behind the copy (it does not wait). The flush before the
   * pivot is unchanged; these only leave it less to write. A failed one fails the job.
   */
  flushBehind?: number;
  /**
   * With flushBehind: nodes whose file is flushed once when the copy starts (active commit:
   * the layers above the base, closed and so flushed at the pivot; their data goes to disk
   * while the copy runs instead). A failure fails the job, as one of the target's does.
   */
  flushAtStart?: BlockNode[];
}

/** How the initial dirty ranges are found and what the pivot does; set by mirror and commit. */
interface MirrorFlavour {
  type: JobType;
  filterDriver: 'mirror_top' | 'commit_top';
  markInitial(job: MirrorJob): Promise<void>;
}

export class MirrorJob extends Job {
  readonly type: JobType;
  readonly source: BlockNode;
  readonly target: BlockNode;
  readonly bitmap: Bitmap;
  readonly copy: BlockCopy;
  readonly autoComplete: boolean;
  filter!: BlockNode;
  private top!: JobTopState;
  private filterInserted = false;
  private pivoted = false;
  private readyReached = false;
  private shouldComplete = false;
  private releaseHold: (() => void) | null = null;
  /** restore target read-only on failure (commit reopens a read-only base) */
  restoreTargetReadOnly = false;
  private readonly flushBehindBytes: number;
  private readonly flushAtStart: BlockNode[];
  private sinceFlush = 0;
  private flushing: Promise<void> | null = null;
  private startFlushes: Promise<void>[] = [];
  /** a flush behind the copy failed: the job fails (a later fdatasync may not report it) */
  private flushError: unknown = null;

  constructor(
    mgr: JobManager,
    opts: MirrorOptions,
    private readonly flavour: MirrorFlavour,
  ) {
    super(mgr, opts, opts.source);
    this.type = flavour.type;
    this.source = opts.source;
    this.target = opts.target;
    this.autoComplete = opts.autoComplete ?? false;
    this.bitmap = new Bitmap(opts.source.getLength(), opts.granularity ?? DEFAULT_CLUSTER_SIZE);
    this.copy = new BlockCopy({ source: opts.source, target: opts.target, bitmap: this.bitmap, mode: 'sync' });
    this.flushBehindBytes = opts.flushBehind ?? 0;
    this.flushAtStart = opts.flushAtStart ?? [];
  }

  override get shouldStop(): boolean {
    return this.isCancelled;
  }

  protected override get completable(): boolean {
    return true;
  }

  protected override cancelIsForced(force: boolean): boolean {
    return force || !this.isReady;
  }

  protected override doComplete(): void {
    this.shouldComplete = true;
  }

  async start(): Promise<void> {
    const graph = this.graph;
    try {
      if (!this.internal) {
        this.source.checkNotBlocked();
        this.target.checkNotBlocked();
        // blocked before the first await: a concurrent start sees the nodes busy
        this.block(this.source);
        this.block(this.target);
      }
      this.filter = await graph.open({ driver: this.flavour.filterDriver, file: this.source.name });
      try {
        this.top = getJobTop(this.filter);
        const inserted = insertFilterDrained(this.filter, this.source); // throws: not inserted
        this.filterInserted = true;
        // QEMU's order: the job's hold on its filter, then its target's BlockBackend
        this.use(this.filter, MIRROR_SOURCE_PERMS);
        if (this.flavour.type === 'commit') {
          // active commit: the layers between top and base disappear at the end; the base
          // is the backing of nodes in use, so it shares everything but resize
          for (let n = this.source.backing; n && n !== this.target; n = n.backing) this.use(n, INTERMEDIATE_PERMS, 'intermediate node');
          this.use(this.target, activeCommitBasePerms(this.source.getLength() > this.target.getLength()));
        } else {
          this.use(this.target, MIRROR_TARGET_PERMS);
        }
        this.top.bitmap = this.bitmap;
        await inserted;
      } catch (e) {
        this.dropUsers(); // before the filter goes: its users would move to the source
        if (this.filterInserted) graph.dropFilter(this.filter);
        else graph.collect(this.filter);
        this.filterInserted = false;
        await graph.settle();
        throw e;
      }
    } catch (e) {
      this.abandon();
      throw e;
    }
    this.top.onDirty = () => this.kick();
    this.created();
    this.startRunning();
  }

  protected async run(): Promise<void> {
    try {
      await this.flavour.markInitial(this);
      if (this.flushBehindBytes > 0) {
        // After the marking, whose reads of the layers' tables would queue behind these
        // syncs. What the target holds unflushed from before the job goes to disk while we
        // copy, so do the layers' (flushed again when they close at the pivot).
        this.flushBehind();
        for (const n of this.flushAtStart) {
          if (!n.readOnly) this.startFlushes.push((n.file ?? n).flush().catch((e: unknown) => void (this.flushError ??= e)));
        }
        this.copy.onCopied = (n) => {
          this.sinceFlush += n;
          if (this.sinceFlush >= this.flushBehindBytes) this.flushBehind();
        };
      }
      this.progressSetRemaining(this.copy.remainingBytes);
      await this.copy.run(this, () => this.onIdle());
    } finally {
      this.copy.onCopied = null;
      await Promise.all([this.flushing, ...this.startFlushes]);
    }
  }

  /** Starts a flush of the target unless one runs (then the next copy starts another). */
  private flushBehind(): void {
    if (this.flushing !== null) return;
    this.sinceFlush = 0;
    // A format's file: its data goes to disk without the format's metadata writeback, which
    // would hold the image's lock (and its allocations) for the length of a sync.
    const node = this.target.file ?? this.target;
    this.flushing = node
      .flush()
      .catch((e: unknown) => {
        this.flushError ??= e;
      })
      .finally(() => {
        this.flushing = null;
      });
  }

  private async onIdle(): Promise<IdleDecision> {
    if (!this.readyReached) {
      this.readyReached = true;
      this.transitionToReady();
    }
    if (this.shouldComplete || this.autoComplete || this.cancelRequested) {
      // Hold the source's writers: whatever they wrote is dirty once they drained.
      const release = await this.filter.tracker.hold();
      if (this.bitmap.count === 0 && this.copy.inFlight === 0) {
        try {
          // the last flush behind may still run: the final one need not wait for it to start
          await Promise.all([this.flushing, ...this.startFlushes, this.target.flush()]);
          if (this.flushError !== null) throw this.flushError;
        } catch (e) {
          release();
          throw e;
        }
        this.releaseHold = release;
        return 'stop';
      }
      release();
      return 'continue';
    }
    await this.sleep(Infinity);
    return 'continue';
  }

  /** Marks [offset, offset+length) of every allocated run of `node`'s own layer dirty. */
  async markAllocated(node: BlockNode): Promise<void> {
    const len = Math.min(node.getLength(), this.bitmap.size);
    for (let pos = 0; pos < len; ) {
      const s = await node.blockStatus(pos, len - pos);
      if (s.allocated) this.bitmap.setRange(pos, s.length);
      pos += s.length;
    }
  }

  protected override prepare(): void {
    const pivot = (this.shouldComplete || this.autoComplete) && !this.cancelRequested;
    if (!pivot) return;
    // Validated first by replaceNode: a failure leaves the graph unchanged.
    this.graph.replaceNode(this.filter, this.target);
    this.pivoted = true;
    this.filterInserted = false;
    this.top.redirect = this.target;
  }

  protected override async clean(): Promise<void> {
    this.top.bitmap = null;
    this.top.onDirty = null;
    if (this.filterInserted) {
      this.filterInserted = false;
      this.graph.dropFilter(this.filter);
    }
    if (!this.pivoted && this.restoreTargetReadOnly) {
      await this.target.setReadOnly(true).catch(() => {});
    }
    const r = this.releaseHold;
    this.releaseHold = null;
    r?.();
    // not graph.settle(): this may run inside the close of a node above (replication)
    await this.graph.whenClosed(this.filter);
  }
}

export function checkGranularity(g: number | undefined): void {
  if (g === undefined) return;
  if (!Number.isSafeInteger(g) || g < 512 || g > 64 * 1024 * 1024) {
    throw new InvalidArgumentError(`Parameter 'granularity' expects a value in range [512B, 64MB]`);
  }
  if ((g & (g - 1)) !== 0) throw new InvalidArgumentError('Granularity must be a power of 2');
}

/**
 * Starts a mirror from `source` to the existing `target` node (any node: a file, qcow2,
 * an NBD client). Resolves once the filter is in the graph and the job runs.
 */
export async function startMirror(mgr: JobManager, opts: MirrorOptions): Promise<MirrorJob> {
  if (!['full', 'top', 'none'].includes(opts.sync)) throw new InvalidArgumentError(`Parameter 'sync' does not accept value '${String(opts.sync)}'`);
  if (opts.mode !== undefined && opts.mode !== 'existing') {
    throw new InvalidArgumentError(`mirror mode '${opts.mode}' is not supported: create the target and use mode=existing`);
  }
  checkOnError('on-source-error', opts.onSourceError);
  checkOnError('on-target-error', opts.onTargetError);
  checkGranularity(opts.granularity);
  if (opts.source === opts.target) throw new InvalidArgumentError(`Can't mirror node into itself`);
  if (opts.source.graph.reaches(opts.target, opts.source)) throw new StateError(`Making '${opts.target.name}' the mirror target of '${opts.source.name}' would create a cycle`);
  const sync = opts.sync;
  const job = new MirrorJob(mgr, opts, {
    type: 'mirror',
    filterDriver: 'mirror_top',
    async markInitial(j) {
      // QEMU's mirror_run: the command was accepted, the job fails (EINVAL) at its start
      if (j.source.getLength() !== j.target.getLength()) throw new BlockError('EINVAL', 'Source and target image have different sizes');
      if (sync === 'full') j.bitmap.setAll();
      else if (sync === 'top') await j.markAllocated(j.source);
    },
  });
  await job.start();
  return job;
}

/** Active commit: a mirror from `top` (the active layer) into `base` below it. */
export async function startActiveCommit(
  mgr: JobManager,
  opts: JobOptions & {
    top: BlockNode;
    base: BlockNode;
    layers: BlockNode[];
    autoComplete?: boolean;
    restoreBaseReadOnly: boolean;
    flushBehind?: number;
  },
): Promise<MirrorJob> {
  const layers = opts.layers;
  const mopts: MirrorOptions = { ...opts, source: opts.top, target: opts.base, sync: 'none' };
  if (opts.flushBehind !== undefined) mopts.flushAtStart = layers;
  const job = new MirrorJob(mgr, mopts, {
    type: 'commit',
    filterDriver: 'commit_top',
    async markInitial(j) {
      for (const l of layers) await j.markAllocated(l);
    },
  });
  job.restoreTargetReadOnly = opts.restoreBaseReadOnly;
  await job.start();
  return job;
}
