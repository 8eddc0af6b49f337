// The commit job: folds the layers from `top` down to (not including) `base` into `base`.
// - active commit (top is the layer users write to): a mirror from top into base with a
//   commit_top filter tracking concurrent writes; READY once converged, then `complete`
//   (or autoComplete) switches the graph in one step: every parent of top points at base
//   and the layers above base drop out. Replication's failover uses this (spec 5.3).
// - intermediate commit (top has an overlay): copies, then the overlay's backing points at
//   base.
// Either way a failure or cancel ends the job with its error and leaves the graph as it
// was. A read-only base is reopened read-write for the job (and read-only again after an
// intermediate commit, or after a failure).

import { InvalidArgumentError } from '../errors.js';
import { BlockNode } from '../block/node.js';
import { Bitmap } from '../util/bitmap.js';
import { BlockCopy, DEFAULT_CLUSTER_SIZE } from '../block/block-copy.js';
import { Job, type JobManager, type JobOptions, type JobType, type OnError } from './job.js';
import { MirrorJob, startActiveCommit } from './mirror.js';
import { checkOnError } from './filter-insert.js';

export interface CommitOptions {
  jobId?: string;
  top: BlockNode;
  base: BlockNode;
  /** top is the active layer (users write to it) */
  active: boolean;
  /** active commit: pivot by itself once converged */
  autoComplete?: boolean;
  internal?: boolean;
  speed?: number;
  onError?: OnError;
  autoFinalize?: boolean;
  autoDismiss?: boolean;
  onProgress?: (current: number, total: number) => void;
  /** active commit: flush base behind the copy every that many bytes (MirrorOptions.flushBehind) */
  flushBehind?: number;
}

export type CommitJob = MirrorJob | IntermediateCommitJob;

/** The next layer down: the backing file, or a filter's filtered child. */
function below(node: BlockNode): BlockNode | null {
  return node.backing ?? node.filtered;
}

/** The layers from `top` down to base, base excluded; null if base is not in the chain. */
export function layersAbove(top: BlockNode, base: BlockNode): BlockNode[] | null {
  const out: BlockNode[] = [];
  for (let n: BlockNode | null = top; n; n = below(n)) {
    if (n === base) return out;
    out.push(n);
  }
  return null;
}

/** The node whose backing child is `node` (an intermediate layer's overlay). */
function overlayOf(node: BlockNode): BlockNode | null {
  for (const e of node.parents) {
    if (e.role === 'backing' && e.parent instanceof BlockNode) return e.parent;
  }
  return null;
}

export class IntermediateCommitJob extends Job {
  readonly type: JobType = 'commit';
  readonly bitmap: Bitmap;
  readonly copy: BlockCopy;

  constructor(
    mgr: JobManager,
    opts: JobOptions,
    readonly top: BlockNode,
    readonly base: BlockNode,
    private readonly layers: BlockNode[],
    private readonly restoreBaseReadOnly: boolean,
  ) {
    super(mgr, opts, top);
    this.bitmap = new Bitmap(top.getLength(), DEFAULT_CLUSTER_SIZE);
    this.copy = new BlockCopy({ source: top, target: base, bitmap: this.bitmap, mode: 'sync' });
  }

  start(): void {
    if (!this.internal) {
      try {
        this.top.checkNotBlocked();
        this.base.checkNotBlocked();
      } catch (e) {
        this.abandon();
        throw e;
      }
      this.block(this.top);
      this.block(this.base);
    }
    this.created();
    this.startRunning();
  }

  protected async run(): Promise<void> {
    const len = Math.min(this.top.getLength(), this.base.getLength());
    for (const l of this.layers) {
      for (let pos = 0; pos < len; ) {
        const s = await l.blockStatus(pos, len - pos);
        if (s.allocated) this.bitmap.setRange(pos, s.length);
        pos += s.length;
      }
    }
    this.progressSetRemaining(this.copy.remainingBytes);
    await this.copy.run(this, async () => 'stop');
    await this.base.flush();
  }

  protected override prepare(): void {
    const overlay = overlayOf(this.top);
    if (!overlay) throw new InvalidArgumentError(`Node '${this.top.name}' has no overlay any more`);
    this.base.graph.replaceChild(overlay, 'backing', this.base);
  }

  protected override async clean(): Promise<void> {
    if (this.restoreBaseReadOnly) await this.base.setReadOnly(true).catch(() => {});
  }
}

/**
 * Starts a commit of `top` (down to, not including, `base`) into `base`. Resolves once the
 * job runs; argument errors throw with the graph unchanged.
 */
export async function startCommit(mgr: JobManager, opts: CommitOptions): Promise<CommitJob> {
  const { top, base } = opts;
  checkOnError('on-error', opts.onError);
  if (top === base) throw new InvalidArgumentError('cannot commit an image into itself');
  const layers = layersAbove(top, base);
  if (!layers) throw new InvalidArgumentError(`'${base.name}' is not in this backing file chain`); // QEMU's words
  if (!opts.active && !overlayOf(top)) {
    throw new InvalidArgumentError(`Top image '${top.name}' has no overlay: commit it with active=true`);
  }
  if (top.getLength() > base.getLength()) {
    throw new InvalidArgumentError(
      `Top image '${top.name}' is larger than base image '${base.name}' (${top.getLength()} and ${base.getLength()} bytes)`,
    );
  }
  const jobOpts: JobOptions = {};
  if (opts.jobId !== undefined) jobOpts.jobId = opts.jobId;
  if (opts.internal !== undefined) jobOpts.internal = opts.internal;
  if (opts.speed !== undefined) jobOpts.speed = opts.speed;
  if (opts.autoFinalize !== undefined) jobOpts.autoFinalize = opts.autoFinalize;
  if (opts.autoDismiss !== undefined) jobOpts.autoDismiss = opts.autoDismiss;
  if (opts.onProgress !== undefined) jobOpts.onProgress = opts.onProgress;
  if (opts.onError !== undefined) {
    jobOpts.onSourceError = opts.onError;
    jobOpts.onTargetError = opts.onError;
  }
  const wasReadOnly = base.readOnly;
  if (wasReadOnly) await base.setReadOnly(false);
  try {
    if (opts.active) {
      return await startActiveCommit(mgr, {
        ...jobOpts,
        top,
        base,
        layers,
        restoreBaseReadOnly: wasReadOnly,
        ...(opts.autoComplete !== undefined ? { autoComplete: opts.autoComplete } : {}),
        ...(opts.flushBehind !== undefined ? { flushBehind: opts.flushBehind } : {}),
      });
    }
    const job = new IntermediateCommitJob(mgr, jobOpts, top, base, layers, wasReadOnly);
    job.start();
    return job;
  } catch (e) {
    if (wasReadOnly) await base.setReadOnly(true).catch(() => {});
    throw e;
  }
}
