// The "replication" filter driver and its per-node state: start, checkpoint, get_error and
// stop in both modes, with the I/O table of docs/replication.md ("Stages") and lockstep's
// decisions (numbered as in docs/replication.md; they win over QEMU's behaviour):
//   2  stop(failover=false) on the secondary performs a real final checkpoint;
//   3  a planned cancel of the copy job never sets the sticky error;
//   5  checkpoints hold and drain I/O themselves; a partial failure sets the sticky error;
//   6  failover fences every user backend (export) of the secondary disk;
//   7/8 a failed start leaves nothing behind (stage NONE, no job, no blockers, no refs);
//   9  writes of any size are forwarded as they are (requestAlignment 1).
//
// Options: file (required), mode (primary|secondary, required), top-id (secondary only),
// x-copy-unit (secondary only, lockstep's own): the copy unit of the copy-before-write into
// the hidden disk (default QEMU's, max(64 KiB, the hidden disk's cluster size)); refused when
// smaller than the hidden disk's cluster size (copy-before-write.ts says why).
//
// The filter sits in the block layer beside the other filters; the two jobs a secondary runs
// (copy-before-write into the hidden disk, the failover's active commit) belong to the jobs
// layer above, so the filter declares what it needs of them (ReplicationJobs) and the
// replication layer hands the implementation in as a graph service (replication/jobs.ts).
// Block status passes through to `file` (a filter without caps.blockStatus, node.ts).

import { replicationChildPerms } from '../../permissions.js';
import { makeCaps, type BlockDriver, type NodeImpl, type WriteFlags, type ZeroFlags } from '../../driver.js';
import type { BlockNode } from '../../node.js';
import type { BlockGraph } from '../../graph.js';
import { isAllocatedAbove } from '../../chain.js';
import { BlockError, InvalidArgumentError, StateError, STRERROR, assert, errorMessage, type ErrorCode } from '../../../errors.js';
import { MSG, canTransition, readPolicy, writePolicy, type ReplicationMode, type Stage } from './state.js';
import { CHANGED_GRANULARITY, ChangedMap, type ChangedRegion } from './changed.js';
import { badCopyUnit, checkCopyUnit } from '../copy-before-write.js';
import { span } from '../../../util/trace.js';

export interface JobEnd {
  ret: 0 | BlockError;
  cancelled: boolean;
}

export interface CopyJobHandle {
  /** the copy-before-write filter above the secondary disk */
  readonly filter: BlockNode;
  readonly done: Promise<JobEnd>;
  /** clusters copied since the last reset */
  readonly copiedClusters: number;
  /** bytes copied since the job started */
  readonly bytesCopied: number;
  /** every cluster "not yet copied", with no write or copy in flight */
  resetBitmap(): Promise<void>;
  /** ends the job and removes the filter */
  cancel(): Promise<void>;
}

export interface CommitJobHandle {
  readonly done: Promise<JobEnd>;
  cancel(): Promise<void>;
  progress(): { current: number; total: number };
}

/** The two internal jobs a secondary runs (decision 11 in docs/replication.md). */
export interface ReplicationJobs {
  startCopyBeforeWrite(source: BlockNode, target: BlockNode, copyUnit?: number): Promise<CopyJobHandle>;
  startActiveCommit(top: BlockNode, base: BlockNode): Promise<CommitJobHandle>;
}

declare module '../../graph.js' {
  interface GraphServices {
    /**
     * the states of the graph's open replication nodes, newest first, as QEMU keeps them
     * (the *_all operations in replication/registry.ts run over this list)
     */
    replicationStates?: ReplicationState[];
    /** the jobs a secondary's start and failover run, handed in by replication/jobs.ts */
    replicationJobs?: ReplicationJobs;
  }
}

/** The replication states of the graph's open replication nodes, newest first. */
export function replicationStates(graph: BlockGraph): readonly ReplicationState[] {
  return graph.services.replicationStates ?? [];
}

export interface ReplicationStatus {
  'node-name': string;
  mode: ReplicationMode;
  stage: Stage;
  error?: string;
  /**
   * clusters copied into the hidden disk since the last checkpoint (the wire name; the
   * copy-before-write node's info calls the clusters not yet copied 'dirty-clusters')
   */
  'dirty-clusters': number;
  /** bytes copied into the hidden disk since replication started */
  'bytes-copied': number;
  /** wall-clock time of the last completed checkpoint, ms since the epoch */
  'last-checkpoint'?: number;
  /** failover commit progress while failing over */
  'commit-progress'?: { current: number; total: number };
  /** primary: bytes changed since the last x-replication-reset-changed */
  'changed-bytes'?: number;
  /** primary: bytes of writes and write-zeroes forwarded to the secondary successfully */
  'bytes-sent'?: number;
  /** secondary: bytes written into the secondary disk through its copy-before-write filter
   *  (the forward export's writes) since replication started */
  'bytes-received'?: number;
}

export interface ReplicationChanged {
  'node-name': string;
  /** ms since the epoch of the last reset (or of the node's opening) */
  since: number;
  granularity: number;
  bytes: number;
  regions: ChangedRegion[];
}

export class ReplicationState {
  stage: Stage = 'none';
  /** 0, or the errno-like code of the sticky error */
  error: ErrorCode | 0 = 0;
  private backupJob: CopyJobHandle | null = null;
  private commitJob: CommitJobHandle | null = null;
  private top: BlockNode | null = null;
  private hidden: BlockNode | null = null;
  private secondary: BlockNode | null = null;
  private origHiddenRO = false;
  private origSecondaryRO = false;
  /** set while stop cancels the copy job on purpose (decision 3) */
  private plannedCancel = false;
  private lastCheckpoint: number | undefined;
  private bytesCopiedBefore = 0;
  /** primary: bytes forwarded successfully */
  private bytesSent = 0;
  /** secondary: bytes received through the copy jobs' filters that have ended */
  private bytesReceivedBefore = 0;
  /** serialises control operations on this node */
  private control: Promise<unknown> = Promise.resolve();
  /** primary: what the guest changed since the last confirmed checkpoint */
  readonly changed: ChangedMap | null;

  constructor(
    readonly graph: BlockGraph,
    readonly node: BlockNode,
    readonly mode: ReplicationMode,
    readonly topId: string | undefined,
    /** the copy-before-write unit asked for (x-copy-unit), or QEMU's */
    readonly copyUnit?: number,
  ) {
    this.changed = mode === 'primary' ? new ChangedMap(node.file?.getLength() ?? 0) : null;
  }

  private get jobs(): ReplicationJobs {
    const j = this.graph.services.replicationJobs;
    if (!j) throw new StateError('replication jobs are not wired for this graph (replication/jobs.ts)');
    return j;
  }

  private setStage(to: Stage): void {
    assert(canTransition(this.stage, to), `replication stage ${this.stage} -> ${to}`);
    this.stage = to;
  }

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.control.then(fn, fn);
    this.control = p.catch(() => {});
    return p;
  }

  // ---- I/O ------------------------------------------------------------------------------

  private get file(): BlockNode {
    const f = this.node.file;
    if (!f) throw new BlockError('ENOMEDIUM', `replication node '${this.node.name}' has no file`);
    return f;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    if (readPolicy(this.mode, this.stage) === 'eio') throw new BlockError('EIO');
    return this.file.read(offset, length);
  }

  private async mutate(
    offset: number,
    length: number,
    op: (target: BlockNode, offset: number, length: number, at: number) => Promise<void>,
  ): Promise<void> {
    // marked before the forward, so that a write the secondary never got is still listed
    this.changed?.mark(offset, length);
    switch (writePolicy(this.mode, this.stage)) {
      case 'eio':
        throw new BlockError('EIO');
      case 'pass':
        return op(this.file, offset, length, 0);
      case 'forward-record':
        try {
          await op(this.file, offset, length, 0);
          this.bytesSent += length;
        } catch (e) {
          // Primary: a failed forward never fails the guest write; get_error reports it.
          // Recorded only while still RUNNING (a stop may have raced the request).
          if (this.stage === 'running') this.error = e instanceof BlockError ? e.code : 'EIO';
        }
        return;
      case 'route-by-allocation': {
        const active = this.file;
        const secondary = this.secondary;
        if (!secondary) throw new BlockError('EIO');
        for (let pos = offset; pos < offset + length; ) {
          const r = await isAllocatedAbove(active, secondary, pos, offset + length - pos);
          await op(r.allocated ? active : secondary, pos, r.length, pos - offset);
          pos += r.length;
        }
        return;
      }
    }
  }

  write(offset: number, data: Buffer, flags: WriteFlags): Promise<void> {
    return this.mutate(offset, data.length, (t, off, len, at) => t.write(off, data.subarray(at, at + len), flags));
  }

  writeZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    return this.mutate(offset, length, (t, off, len) => t.writeZeroes(off, len, flags));
  }

  // ---- control: start ---------------------------------------------------------------------

  start(mode: ReplicationMode): Promise<void> {
    return this.serial(() => this.doStart(mode));
  }

  private async doStart(mode: ReplicationMode): Promise<void> {
    if (this.stage === 'done' || this.stage === 'failover') return; // ignored after failover
    if (this.stage !== 'none') throw new StateError(MSG.runningOrDone);
    if (mode !== this.mode) throw new StateError(MSG.badMode(this.mode, mode));
    if (this.mode === 'primary') {
      this.setStage('running');
      this.error = 0;
      return;
    }
    const active = this.node.file;
    if (!active || !active.backing) throw new StateError(MSG.noActiveBacking);
    const hidden = active.backing;
    if (!hidden.backing) throw new StateError(MSG.noHiddenBacking);
    const secondary = hidden.backing;
    if (!secondary.backends().some((b) => b.user)) throw new StateError(MSG.noBackend);
    const len = active.getLength();
    if (hidden.getLength() !== len || secondary.getLength() !== len) throw new StateError(MSG.lengths);
    if (!active.driver.supportsMakeEmpty || !hidden.driver.supportsMakeEmpty) throw new StateError(MSG.makeEmpty);

    // Step 7: hidden and secondary read-write, remembering what to restore.
    this.origHiddenRO = hidden.readOnly;
    this.origSecondaryRO = secondary.readOnly;
    try {
      await hidden.setReadOnly(false);
      await secondary.setReadOnly(false);
    } catch (e) {
      await this.restoreReadOnly(hidden, secondary);
      throw e;
    }

    // Step 9 before step 8, so that a bad top-id leaves no references behind (decision 8).
    const top = this.topId !== undefined ? this.graph.lookup(this.topId) : null;
    if (!top || top.parentNodes().length > 0 || !this.graph.reaches(top, this.node)) {
      await this.restoreReadOnly(hidden, secondary);
      throw new StateError(MSG.topId);
    }

    this.graph.attach(this.node, 'hidden disk', hidden);
    this.graph.attach(this.node, 'secondary disk', secondary);
    this.hidden = hidden;
    this.secondary = secondary;
    this.top = top;
    top.blockers.add(MSG.blocker);

    try {
      const job = await this.jobs.startCopyBeforeWrite(secondary, hidden, this.copyUnit);
      this.backupJob = job;
      void job.done.then((r) => this.backupCompleted(job, r.ret));
    } catch (e) {
      await this.rollbackStart();
      throw e;
    }
    this.setStage('running');
    try {
      await this.checkpointSecondary();
    } catch (e) {
      // QEMU stays RUNNING here; lockstep rolls the whole start back (decisions 7 and 8).
      await this.rollbackStart();
      throw e;
    }
    this.error = 0;
    this.bytesCopiedBefore = 0;
    this.bytesReceivedBefore = 0;
  }

  private async restoreReadOnly(hidden: BlockNode, secondary: BlockNode): Promise<void> {
    await hidden.setReadOnly(this.origHiddenRO).catch(() => {});
    await secondary.setReadOnly(this.origSecondaryRO).catch(() => {});
  }

  /** Returns a node started (or half started) by this process to stage NONE. */
  async rollbackStart(): Promise<void> {
    if (this.mode === 'primary') {
      if (this.stage === 'running') this.stage = 'none';
      this.error = 0;
      return;
    }
    const job = this.backupJob;
    if (job) {
      this.plannedCancel = true;
      try {
        await job.cancel();
      } finally {
        this.plannedCancel = false;
      }
      this.backupJob = null;
    }
    this.releaseStartResources();
    if (this.hidden && this.secondary) await this.restoreReadOnly(this.hidden, this.secondary);
    this.hidden = null;
    this.secondary = null;
    this.stage = 'none';
    this.error = 0;
  }

  private releaseStartResources(): void {
    this.top?.blockers.delete(MSG.blocker);
    this.top = null;
    if (this.node.children.has('hidden disk')) this.graph.detach(this.node, 'hidden disk');
    if (this.node.children.has('secondary disk')) this.graph.detach(this.node, 'secondary disk');
  }

  /** The copy job ended: planned (stop) or not (an error: sticky EIO). */
  private backupCompleted(job: CopyJobHandle, ret: 0 | BlockError): void {
    if (this.backupJob === job) this.backupJob = null;
    this.bytesCopiedBefore += job.bytesCopied;
    this.bytesReceivedBefore += job.filter.bytesWritten;
    if (!this.plannedCancel && this.stage !== 'failover') {
      this.error = ret === 0 ? 'EIO' : ret.code;
    }
    if (!this.plannedCancel) this.top?.blockers.delete(MSG.blocker);
  }

  // ---- control: checkpoint ------------------------------------------------------------

  doCheckpoint(): Promise<void> {
    return this.serial(async () => {
      if (this.stage === 'done' || this.stage === 'failover') return;
      if (this.mode === 'primary') return;
      if (this.stage !== 'running') throw new StateError(MSG.backupCancelled);
      await this.checkpointSecondary();
    });
  }

  /**
   * Decision 5: hold new I/O on the replication node and on the copy-before-write filter
   * (primary writes) and drain what is in flight, then reset the copy bitmap and empty both
   * overlays, then release. A partial failure sets the sticky error.
   */
  private async checkpointSecondary(): Promise<void> {
    const job = this.backupJob;
    if (!job) throw new StateError(MSG.backupCancelled);
    const releases: Array<() => void> = [];
    try {
      releases.push(await span('ckpt.hold-node', -1, this.node.tracker.hold()));
      releases.push(await span('ckpt.hold-cbw', -1, job.filter.tracker.hold()));
      await span('ckpt.empty', -1, this.emptyOverlays(job));
    } finally {
      for (const r of releases.reverse()) r();
    }
    this.lastCheckpoint = Date.now();
  }

  /** Resets the copy bitmap and empties active then hidden; the caller holds I/O. */
  private async emptyOverlays(job: CopyJobHandle): Promise<void> {
    await job.resetBitmap();
    const active = this.node.file;
    const hidden = active?.backing ?? null;
    if (!active || !active.isOpen) throw new StateError(MSG.activeEjected(active?.name ?? ''));
    await this.makeEmpty(active);
    if (!hidden || !hidden.isOpen) {
      this.error = 'EIO';
      throw new StateError(MSG.hiddenEjected(hidden?.name ?? ''));
    }
    try {
      await this.makeEmpty(hidden);
    } catch (e) {
      // active is empty, hidden is not: the next checkpoint must not be taken as good
      this.error = 'EIO';
      throw e;
    }
  }

  private async makeEmpty(n: BlockNode): Promise<void> {
    try {
      await n.makeEmpty();
    } catch (e) {
      const reason = e instanceof BlockError ? STRERROR[e.code] : errorMessage(e);
      throw new StateError(MSG.failedToEmpty(n.filename, reason));
    }
  }

  // ---- control: get_error -------------------------------------------------------------

  getError(): void {
    if (this.stage === 'none') throw new StateError(MSG.notRunning);
    if (this.error !== 0) throw new StateError(MSG.ioError);
  }

  // ---- control: stop ------------------------------------------------------------------

  stop(failover: boolean): Promise<void> {
    return this.serial(() => this.doStop(failover));
  }

  private async doStop(failover: boolean): Promise<void> {
    if (this.stage === 'done' || this.stage === 'failover') return;
    if (this.stage !== 'running') throw new StateError(MSG.notRunning);
    if (this.mode === 'primary') {
      this.setStage('done');
      this.error = 0;
      return;
    }
    if (failover) return this.failover();
    // Decision 2: a real final checkpoint, then stop copying, DONE, success.
    const job = this.backupJob;
    let err: unknown = null;
    if (job) {
      const releases: Array<() => void> = [];
      try {
        releases.push(await this.node.tracker.hold());
        releases.push(await job.filter.tracker.hold());
        try {
          await this.emptyOverlays(job);
          this.lastCheckpoint = Date.now();
        } catch (e) {
          err = e;
        }
        await this.cancelBackup(job);
      } finally {
        for (const r of releases.reverse()) r();
      }
    } else {
      err = new StateError(MSG.backupCancelled);
    }
    this.top?.blockers.delete(MSG.blocker);
    this.top = null;
    if (this.hidden && this.secondary) await this.restoreReadOnly(this.hidden, this.secondary);
    this.setStage('done');
    if (err) throw err;
  }

  private async cancelBackup(job: CopyJobHandle): Promise<void> {
    this.plannedCancel = true;
    try {
      await job.cancel();
    } finally {
      this.plannedCancel = false;
    }
    if (this.backupJob === job) this.backupJob = null;
  }

  /** Decision 6 (fence), then stop copying and commit active+hidden into the secondary. */
  private async failover(): Promise<void> {
    const secondary = this.secondary;
    assert(secondary, 'secondary disk known while running');
    const job = this.backupJob;
    for (const n of [secondary, ...(job ? [job.filter] : [])]) {
      for (const b of n.backends()) if (b.user && !b.readOnly) b.fenced = true;
    }
    if (job) await this.cancelBackup(job);
    this.top?.blockers.delete(MSG.blocker);
    this.top = null;
    this.setStage('failover');
    const active = this.node.file;
    try {
      if (!active) throw new StateError(MSG.activeEjected(''));
      const commit = await this.jobs.startActiveCommit(active, secondary);
      this.commitJob = commit;
      void commit.done.then((r) => this.commitCompleted(r.ret));
    } catch (e) {
      // Decision 8: never FAILOVER forever.
      this.setStage('failover-failed');
      this.error = 'EIO';
      throw e;
    }
  }

  private commitCompleted(ret: 0 | BlockError): void {
    this.commitJob = null;
    if (this.stage !== 'failover') return; // closed meanwhile
    if (ret === 0) {
      this.setStage('done');
      this.releaseStartResources();
      if (this.hidden) void this.hidden.setReadOnly(this.origHiddenRO).catch(() => {});
      this.hidden = null;
      this.error = 0;
    } else {
      this.setStage('failover-failed');
      this.error = 'EIO';
    }
  }

  /** Resolves when a failover commit in progress has ended. */
  async waitFailover(): Promise<void> {
    await this.control;
    const c = this.commitJob;
    if (c) await c.done;
  }

  // ---- close and query ------------------------------------------------------------------

  async close(): Promise<void> {
    if (this.stage === 'running') await this.stop(false).catch(() => {});
    else if (this.stage === 'failover' && this.commitJob) {
      const c = this.commitJob;
      this.commitJob = null;
      await c.cancel().catch(() => {});
    }
    this.top?.blockers.delete(MSG.blocker);
    const list = this.graph.services.replicationStates;
    if (list) this.graph.services.replicationStates = list.filter((e) => e !== this);
  }

  status(): ReplicationStatus {
    const s: ReplicationStatus = {
      'node-name': this.node.name,
      mode: this.mode,
      stage: this.stage,
      'dirty-clusters': this.backupJob?.copiedClusters ?? 0,
      'bytes-copied': this.bytesCopiedBefore + (this.backupJob?.bytesCopied ?? 0),
    };
    if (this.error !== 0) s.error = STRERROR[this.error];
    if (this.lastCheckpoint !== undefined) s['last-checkpoint'] = this.lastCheckpoint;
    const c = this.commitJob;
    if (c) s['commit-progress'] = c.progress();
    if (this.changed) s['changed-bytes'] = this.changed.bytes();
    if (this.mode === 'primary') s['bytes-sent'] = this.bytesSent;
    else s['bytes-received'] = this.bytesReceivedBefore + (this.backupJob?.filter.bytesWritten ?? 0);
    return s;
  }

  /** Primary only: the regions changed since the last reset. */
  changedRegions(): ReplicationChanged | null {
    const m = this.changed;
    if (!m) return null;
    const regions = m.regions();
    return {
      'node-name': this.node.name,
      since: m.since,
      granularity: CHANGED_GRANULARITY,
      bytes: m.bytes(),
      regions,
    };
  }
}

export const replicationDriver: BlockDriver = {
  name: 'replication',
  kind: 'filter',
  childPerms: (node, role) => replicationChildPerms(!node.readOnly, role === 'file'),
  async open(ctx, o): Promise<NodeImpl> {
    const mode = o.enumOf('mode', ['primary', 'secondary']);
    const topId = o.string('top-id');
    const copyUnit = o.size('x-copy-unit');
    const fileOpt = o.raw('file');
    o.done();
    const bad = copyUnit === undefined ? null : badCopyUnit(copyUnit);
    if (bad) throw new InvalidArgumentError(`Parameter 'x-copy-unit': ${bad}`);
    const active = await ctx.openChild('file', fileOpt, { required: true });
    if (mode === undefined) throw new InvalidArgumentError(MSG.missingMode);
    if (mode === 'primary' && topId !== undefined) throw new InvalidArgumentError(MSG.primaryTopId);
    if (mode === 'secondary' && topId === undefined) throw new InvalidArgumentError(MSG.missingTopId);
    if (mode === 'primary' && copyUnit !== undefined) throw new InvalidArgumentError(`Parameter 'x-copy-unit' is only for mode 'secondary'`);
    // refused here already when the hidden disk is in place (start checks again: the chain
    // may change before it)
    const hidden = active?.backing;
    if (copyUnit !== undefined && hidden) checkCopyUnit(copyUnit, hidden);
    const node = ctx.node;
    const state = new ReplicationState(ctx.graph, node, mode, topId, copyUnit);
    (ctx.graph.services.replicationStates ??= []).unshift(state);
    const impl: NodeImpl & { replication: ReplicationState } = {
      replication: state,
      // only the forwarding (primary-mode) filter hides its failures; a secondary-mode node is the
      // disk itself (the survivor's one-child quorum after failover): it votes
      caps: makeCaps({ filter: true, writeZeroes: true, discard: true, fua: true, noQuorumVote: mode === 'primary' }),
      get filename() {
        return node.file?.filename ?? node.name;
      },
      getLength: () => node.file?.getLength() ?? 0,
      read: (offset, length) => state.read(offset, length),
      write: (offset, data, flags) => state.write(offset, data, flags),
      writeZeroes: (offset, length, flags) => state.writeZeroes(offset, length, flags),
      // The table's discard row: success and no effect in every stage (spec 2.3). The
      // primary disk below the quorum did discard, so the region differs from now on.
      discard: async (offset, length) => {
        state.changed?.mark(offset, length);
      },
      // Flush is never gated (spec 2.3): every writable child is flushed, results as they are.
      flush: async () => {
        for (const e of node.children.values()) if (!e.child.readOnly && e.child.isOpen) await e.child.flush();
      },
      close: () => state.close(),
      info: () => ({ mode, ...(topId !== undefined ? { 'top-id': topId } : {}), ...(copyUnit !== undefined ? { 'x-copy-unit': copyUnit } : {}), stage: state.stage }),
    };
    return impl;
  },
};

/** The replication state of a node opened with the replication driver, or null. */
export function replicationStateOf(node: BlockNode): ReplicationState | null {
  if (node.driver.name !== 'replication' || !node.isOpen) return null;
  return (node.impl as NodeImpl & { replication?: ReplicationState }).replication ?? null;
}
