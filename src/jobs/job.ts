// Block jobs: QEMU's job status machine and verb table (job.c), the Job base class every
// job derives from, and the JobManager (one per graph) that owns job ids, applies the
// monitor's verbs and emits QMP-shaped events.
//
// Lifecycle of a job, as in QEMU 7.2:
//   created -> running (<-> paused, -> ready <-> standby) -> waiting -> pending
//     -> [finalize: prepare, then commit | abort, clean] -> concluded -> null (dismissed)
//   any failure or cancel goes through aborting -> concluded.
// A job's `run()` does the work and checks `pausePoint()` between steps: that is where
// pause, cancel and rate limiting take effect (QEMU's job_pause_point / yield_and_check).
//
// Events (emitted as mgr.emit('event', name, data), never for internal jobs):
//   JOB_STATUS_CHANGE {id, status}
//   BLOCK_JOB_READY {type, device, len, offset, speed}
//   BLOCK_JOB_PENDING {type, id}
//   BLOCK_JOB_COMPLETED {type, device, len, offset, speed, error?}
//   BLOCK_JOB_CANCELLED {type, device, len, offset, speed}
//   BLOCK_JOB_ERROR {device, operation: 'read'|'write', action: 'report'|'ignore'|'stop'}

import type { Backend } from '../block/backend.js';
import type { Perms } from '../block/permissions.js';
import { EventEmitter } from 'node:events';
import { BlockError, InvalidArgumentError, NotFoundError, StateError, assert, errorMessage } from '../errors.js';
import type { BlockGraph } from '../block/graph.js';
import type { BlockNode } from '../block/node.js';
import { RateLimit } from '../util/rate-limit.js';
import {
  canTransition,
  verbAllowed,
  type BlockJobInfo,
  type ErrorAction,
  type IoStatus,
  type JobInfo,
  type JobOptions,
  type JobResult,
  type JobStatus,
  type JobType,
  type JobVerb,
  type OnError,
} from './job-status.js';

// Re-exported so that users of jobs import from one module.
export {
  JOB_STATUSES,
  JOB_TRANSITIONS,
  JOB_VERBS,
  JOB_VERB_TABLE,
  ON_ERROR_VALUES,
  canTransition,
  verbAllowed,
} from './job-status.js';
export type {
  BlockJobInfo,
  ErrorAction,
  IoStatus,
  JobInfo,
  JobOptions,
  JobResult,
  JobStatus,
  JobType,
  JobVerb,
  OnError,
} from './job-status.js';

/** QEMU's id_wellformed: a letter, then letters, digits, '-', '.', '_'. */
const ID_RE = /^[A-Za-z][A-Za-z0-9_.-]*$/;


function toBlockError(e: unknown): BlockError {
  if (e instanceof BlockError) return e;
  return new BlockError('EIO', errorMessage(e), { cause: e });
}

/** The name of the device (named backend) on `node` or on the nearest node above it: QEMU's
 *  default block job id (a bare node has none). */
export function deviceName(node: BlockNode): string | undefined {
  const seen = new Set<BlockNode>();
  const queue = [node];
  while (queue.length > 0) {
    const n = queue.shift()!;
    if (seen.has(n)) continue;
    seen.add(n);
    const b = n.backends().find((x) => x.name !== undefined);
    if (b) return b.name;
    queue.push(...n.parentNodes());
  }
  return undefined;
}

export abstract class Job {
  abstract readonly type: JobType;
  readonly id: string;
  readonly internal: boolean;
  readonly autoFinalize: boolean;
  readonly autoDismiss: boolean;
  readonly onSourceError: OnError;
  readonly onTargetError: OnError;
  readonly done: Promise<JobResult>;

  status: JobStatus = 'undefined';
  ioStatus: IoStatus = 'ok';
  progressCurrent = 0;
  progressTotal = 0;
  /** the error that ended the job */
  error: BlockError | null = null;

  protected readonly rate: RateLimit;
  /** QEMU's `cancelled`: a cancel was requested */
  protected cancelRequested = false;
  /** QEMU's `force_cancel`: the cancel really aborts (not a READY mirror's soft cancel) */
  protected forceCancel = false;
  private pauseCount = 0;
  private userPaused = false;
  private busy = false;
  private started = false;
  private finishing = false;
  private kickers: Array<() => void> = [];
  private resolveDone!: (r: JobResult) => void;
  private readonly onProgress: ((current: number, total: number) => void) | undefined;
  /** blockers this job put on nodes, removed when it ends */
  private readonly blocked: BlockNode[] = [];
  /** the permissions the job holds on nodes (its BlockBackends, block_job_add_bdrv) */
  private readonly users: Backend[] = [];

  constructor(
    readonly mgr: JobManager,
    opts: JobOptions,
    /** the node whose name is the job's default id (QEMU: the device name) */
    defaultIdNode: BlockNode | null,
  ) {
    this.internal = opts.internal ?? false;
    let id = opts.jobId;
    if (id !== undefined) {
      if (!ID_RE.test(id)) throw new InvalidArgumentError(`Invalid job ID '${id}'`);
      if (!this.internal && mgr.get(id)) throw new InvalidArgumentError(`Job ID '${id}' already in use`);
    } else if (!this.internal) {
      // QEMU defaults a block job's id to the device (backend) name of its node.
      const named = defaultIdNode ? deviceName(defaultIdNode) : undefined;
      if (named === undefined) throw new InvalidArgumentError('An explicit job ID is required');
      if (mgr.get(named)) throw new InvalidArgumentError(`Job ID '${named}' already in use`);
      id = named;
    }
    this.id = id ?? mgr.internalId();
    const speed = opts.speed ?? 0;
    if (!Number.isSafeInteger(speed) || speed < 0) throw new InvalidArgumentError(`Invalid parameter 'speed'`);
    this.rate = new RateLimit(speed);
    this.autoFinalize = opts.autoFinalize ?? true;
    this.autoDismiss = opts.autoDismiss ?? true;
    this.onSourceError = opts.onSourceError ?? 'report';
    this.onTargetError = opts.onTargetError ?? 'report';
    this.onProgress = opts.onProgress;
    this.done = new Promise<JobResult>((r) => (this.resolveDone = r));
    // The id is taken from now on, so that a concurrent start cannot take it too.
    mgr.register(this);
  }

  get speed(): number {
    return this.rate.speed;
  }
  get graph(): BlockGraph {
    return this.mgr.graph;
  }
  get paused(): boolean {
    return this.pauseCount > 0;
  }
  get isReady(): boolean {
    return this.status === 'ready' || this.status === 'standby';
  }
  /** true once run() returned (waiting, pending, aborting, concluded, null) */
  get isCompleted(): boolean {
    return ['waiting', 'pending', 'aborting', 'concluded', 'null'].includes(this.status);
  }
  /** QEMU's job_is_cancelled: a cancel that aborts the job */
  get isCancelled(): boolean {
    return this.forceCancel;
  }
  /**
   * A block job (backup, mirror, commit): listed by query-block-jobs, reached by the
   * block-job-* verbs, and ends with BLOCK_JOB_COMPLETED/CANCELLED. Plain jobs (create) only
   * have query-jobs, the job-* verbs and JOB_STATUS_CHANGE, as in QEMU.
   */
  get isBlockJob(): boolean {
    return true;
  }

  // ---- what a job implements ------------------------------------------------------------

  /** The work. Throws a BlockError to fail; returns when done or cancelled. */
  protected abstract run(): Promise<void>;
  /** After success, before commit; a failure here aborts the job (graph switches). */
  protected prepare(): void | Promise<void> {}
  /** Success path, after prepare. Must not fail. */
  protected commit(): void {}
  /** Failure or cancel path: restore what the job changed. Must not fail. */
  protected abort(): void {}
  /** Both paths, last: remove filters, drop blockers. Must not fail. */
  protected clean(): void | Promise<void> {}
  /** The `complete` verb for jobs that have one (mirror, active commit). */
  protected doComplete(): void {
    throw new StateError(`The active block job '${this.id}' cannot be completed`);
  }
  protected get completable(): boolean {
    return false;
  }
  /**
   * Whether a non-forced cancel really aborts. Mirror overrides it: after READY a soft
   * cancel ends the job successfully without pivoting.
   */
  protected cancelIsForced(force: boolean): boolean {
    void force;
    return true;
  }

  // ---- helpers for run() -------------------------------------------------------------------

  /** Sets an operation blocker on `node` until the job ends (QEMU's "Node is busy"). */
  protected block(node: BlockNode): void {
    node.blockers.add(this.blockerReason);
    node.jobHolds.add(this);
    this.blocked.push(node);
  }
  /** Removes the blocker `block` set on `node`. */
  protected unblock(node: BlockNode): void {
    const i = this.blocked.indexOf(node);
    if (i < 0) return;
    this.blocked.splice(i, 1);
    node.blockers.delete(this.blockerReason);
    node.jobHolds.delete(this);
  }
  /**
   * Takes `perms` on `node` until the job ends (QEMU's job BlockBackends, unnamed, as 'root';
   * with `role`, QEMU's block_job_add_bdrv: "mirror job 'j0'" as e.g. 'intermediate node').
   * Throws the permission conflict when another user refuses.
   */
  protected use(node: BlockNode, perms: Perms, role?: string): Backend {
    const b = this.graph.createBackend(node, {
      perms,
      user: false,
      jobHold: true,
      ...(role !== undefined ? { role, desc: `${this.type} job '${this.id}'` } : {}),
    });
    this.users.push(b);
    return b;
  }

  /** Drops the job's permissions; the nodes stay (their owners close them). */
  protected dropUsers(): void {
    for (const b of this.users.splice(0).reverse()) {
      b.closed = true;
      b.node.parents.delete(b.edge);
      this.graph.refreshPermsQuietly([b.node]);
    }
  }

  get blockerReason(): string {
    return `block device is in use by block job: ${this.type}`;
  }

  progressAdd(done: number): void {
    this.progressCurrent += done;
    this.onProgress?.(this.progressCurrent, this.progressTotal);
  }
  progressSetRemaining(remaining: number): void {
    this.progressTotal = this.progressCurrent + remaining;
  }
  progressAddRemaining(delta: number): void {
    this.progressTotal += delta;
  }

  /** Wakes the job if it sleeps (rate limit, waiting for dirty data, paused). */
  kick(): void {
    const k = this.kickers;
    this.kickers = [];
    for (const f of k) f();
  }

  /** Sleeps up to `ms` or until kicked (cancel, resume, set-speed, new work). */
  sleep(ms: number): Promise<void> {
    return new Promise<void>((resolve) => {
      let timer: NodeJS.Timeout | null = null;
      const wake = (): void => {
        if (timer) clearTimeout(timer);
        const i = this.kickers.indexOf(wake);
        if (i >= 0) this.kickers.splice(i, 1);
        resolve();
      };
      this.kickers.push(wake);
      if (Number.isFinite(ms)) timer = setTimeout(wake, Math.max(0, ms));
    });
  }

  /**
   * Where pause and cancel take effect. Call between steps; `beforePause` lets a job
   * drain its in-flight work before it reports 'paused'.
   */
  async pausePoint(beforePause?: () => Promise<void>): Promise<void> {
    if (this.cancelRequested || this.pauseCount === 0) return;
    if (beforePause) await beforePause();
    if (this.cancelRequested || this.pauseCount === 0) return;
    const was = this.status;
    this.transition(was === 'ready' ? 'standby' : 'paused');
    this.busy = false;
    while (this.pauseCount > 0 && !this.cancelRequested) await this.sleep(Infinity);
    this.busy = true;
    this.transition(was);
  }

  /** Waits as long as the speed limit asks for, then accounts `bytes`. */
  async rateLimit(bytes: number): Promise<void> {
    for (let d = this.rate.delayMs(); d > 0 && !this.cancelRequested; d = this.rate.delayMs()) {
      this.busy = false;
      await this.sleep(d);
      this.busy = true;
      await this.pausePoint();
    }
    this.rate.account(bytes);
  }

  get shouldStop(): boolean {
    return this.cancelRequested;
  }

  protected transitionToReady(): void {
    this.transition('ready');
    this.emitEvent('BLOCK_JOB_READY', this.blockEventData());
  }

  /**
   * QEMU's block_job_error_action: decides by the policy and emits BLOCK_JOB_ERROR. On
   * 'stop' the job is paused (as by the user) with io-status failed/nospace; resuming
   * retries.
   */
  errorAction(err: BlockError, isRead: boolean): ErrorAction {
    const policy = isRead ? this.onSourceError : this.onTargetError;
    let action: ErrorAction;
    switch (policy) {
      case 'stop':
        action = 'stop';
        break;
      case 'enospc':
        action = err.code === 'ENOSPC' ? 'stop' : 'report';
        break;
      case 'ignore':
        action = 'ignore';
        break;
      default:
        action = 'report';
    }
    this.emitEvent('BLOCK_JOB_ERROR', { device: this.id, operation: isRead ? 'read' : 'write', action });
    if (action === 'stop') {
      this.ioStatus = err.code === 'ENOSPC' ? 'nospace' : 'failed';
      if (!this.userPaused) {
        this.userPaused = true;
        this.pauseCount++;
      }
    }
    return action;
  }

  // ---- lifecycle (driven by the manager and by run()) -----------------------------------------

  protected transition(to: JobStatus): void {
    const from = this.status;
    assert(canTransition(from, to), `job ${this.id}: transition ${from} -> ${to}`);
    this.status = to;
    if (from !== to) this.emitEvent('JOB_STATUS_CHANGE', { id: this.id, status: to });
  }

  protected emitEvent(name: string, data: Record<string, unknown>): void {
    if (!this.internal) this.mgr.emit('event', name, data);
  }

  blockEventData(): Record<string, unknown> {
    return { type: this.type, device: this.id, len: this.progressTotal, offset: this.progressCurrent, speed: this.speed };
  }

  /** The job is set up (status created). Called by the job's start function. */
  protected created(): void {
    this.transition('created');
  }

  /** Setting up failed before `created()`: frees the id and the blockers. */
  protected abandon(): void {
    this.dropUsers();
    for (const n of this.blocked) {
      n.blockers.delete(this.blockerReason);
      n.jobHolds.delete(this);
    }
    this.blocked.length = 0;
    this.mgr.unregister(this);
  }

  /** Starts run() in the background (status running). */
  protected startRunning(): void {
    assert(!this.started, 'job started twice');
    this.started = true;
    this.busy = true;
    this.transition('running');
    void this.runToEnd();
  }

  private async runToEnd(): Promise<void> {
    let err: BlockError | null = null;
    try {
      await this.pausePoint();
      if (!this.cancelRequested) await this.run();
    } catch (e) {
      err = toBlockError(e);
    }
    this.busy = false;
    await this.completed(err);
  }

  /** QEMU's job_completed: run() has returned with `err`. */
  private async completed(err: BlockError | null): Promise<void> {
    if (!err && this.isCancelled) err = BlockError.canceled();
    if (err) {
      this.error = err;
      this.transition('aborting');
      await this.finalizeSingle();
      return;
    }
    this.transition('waiting');
    this.transition('pending');
    if (this.autoFinalize) await this.doFinalize();
    else this.emitEvent('BLOCK_JOB_PENDING', { type: this.type, id: this.id });
  }

  private async doFinalize(): Promise<void> {
    if (this.finishing) return;
    this.finishing = true;
    // before prepare(): a mirror's pivot moves its filter's users onto the target
    this.dropUsers();
    if (!this.error) {
      try {
        await this.prepare();
      } catch (e) {
        this.error = toBlockError(e);
      }
    }
    if (!this.error && this.isCancelled) this.error = BlockError.canceled();
    if (this.error && this.status !== 'aborting') this.transition('aborting');
    await this.finalizeSingle();
  }

  private async finalizeSingle(): Promise<void> {
    this.finishing = true;
    // commit/abort/clean must not fail; if one does anyway (a bug), the job still ends
    // and the failure is logged where the graph logs close errors
    // The job's own permissions go first, as QEMU's mirror drops its target's before the
    // pivot: the source's users then move onto the target.
    this.dropUsers();
    try {
      if (this.error) this.abort();
      else this.commit();
    } catch (e) {
      this.graph.emit('error-log', `job ${this.id}: ${errorMessage(e)}`);
    }
    try {
      await this.clean();
    } catch (e) {
      this.graph.emit('error-log', `job ${this.id}: cleaning up: ${errorMessage(e)}`);
    }
    for (const n of this.blocked) {
      n.blockers.delete(this.blockerReason);
      n.jobHolds.delete(this);
    }
    this.blocked.length = 0;
    if (this.started && this.isBlockJob) {
      if (this.isCancelled) this.emitEvent('BLOCK_JOB_CANCELLED', this.blockEventData());
      else {
        const data = this.blockEventData();
        if (this.error) data['error'] = this.error.message;
        this.emitEvent('BLOCK_JOB_COMPLETED', data);
      }
    }
    this.transition('concluded');
    const result: JobResult = { ret: this.error ?? 0, cancelled: this.isCancelled };
    if (this.autoDismiss || !this.started) this.dismissNow();
    this.resolveDone(result);
  }

  private dismissNow(): void {
    this.transition('null');
    this.mgr.unregister(this);
  }

  // ---- verbs ----------------------------------------------------------------------------------

  applyVerb(verb: JobVerb): void {
    if (!verbAllowed(verb, this.status)) {
      throw new StateError(`Job '${this.id}' in state '${this.status}' cannot accept command verb '${verb}'`);
    }
  }

  /**
   * Cancels the job and resolves with its result once it has ended (filters removed). For
   * the job's creator: a job that already ended just yields its result. With force=false a
   * READY mirror completes without pivoting. The monitor uses userCancel (verb checked).
   */
  async cancel(force = false): Promise<JobResult> {
    if (this.isCompleted && this.status !== 'pending') return this.done;
    this.cancelNow(force);
    return this.done;
  }

  /** The monitor's cancel: checks the verb table, returns once the cancel is requested. */
  userCancel(force = false): void {
    this.applyVerb('cancel');
    this.cancelNow(force);
  }

  private cancelNow(force: boolean): void {
    if (this.status === 'concluded') {
      this.dismissNow();
      return;
    }
    const forced = this.cancelIsForced(force);
    if (this.userPaused) {
      this.userPaused = false;
      this.pauseCount--;
    }
    this.cancelRequested = true;
    this.forceCancel ||= forced;
    if (!this.started) {
      void this.completed(BlockError.canceled());
    } else if (this.status === 'pending') {
      this.error = BlockError.canceled();
      this.transition('aborting');
      void this.finalizeSingle();
    } else {
      this.kick();
    }
  }

  pause(): void {
    this.applyVerb('pause');
    if (this.userPaused) throw new StateError('Job is already paused');
    this.userPaused = true;
    this.pauseCount++;
    this.kick();
  }

  resume(): void {
    if (!this.userPaused || this.pauseCount <= 0) throw new StateError("Can't resume a job that was not paused");
    this.applyVerb('resume');
    this.userPaused = false;
    this.ioStatus = 'ok';
    this.pauseCount--;
    this.kick();
  }

  complete(): void {
    this.applyVerb('complete');
    if (this.pauseCount > 0 || this.cancelRequested || !this.completable) {
      throw new StateError(`The active block job '${this.id}' cannot be completed`);
    }
    this.doComplete();
    this.kick();
  }

  async finalize(): Promise<void> {
    this.applyVerb('finalize');
    await this.doFinalize();
  }

  dismiss(): void {
    this.applyVerb('dismiss');
    this.dismissNow();
  }

  setSpeed(speed: number): void {
    this.applyVerb('set-speed');
    if (!Number.isSafeInteger(speed) || speed < 0) throw new InvalidArgumentError(`Invalid parameter 'speed'`);
    this.rate.setSpeed(speed);
    this.kick();
  }

  // ---- queries ---------------------------------------------------------------------------------

  blockJobInfo(): BlockJobInfo {
    const info: BlockJobInfo = {
      type: this.type,
      device: this.id,
      len: this.progressTotal,
      offset: this.progressCurrent,
      busy: this.busy,
      paused: this.pauseCount > 0,
      speed: this.speed,
      'io-status': this.ioStatus,
      ready: this.isReady,
      status: this.status,
      'auto-finalize': this.autoFinalize,
      'auto-dismiss': this.autoDismiss,
    };
    if (this.error && this.status === 'concluded') info.error = this.error.message;
    return info;
  }

  jobInfo(): JobInfo {
    const info: JobInfo = {
      id: this.id,
      type: this.type,
      status: this.status,
      'current-progress': this.progressCurrent,
      'total-progress': this.progressTotal,
    };
    if (this.error && this.status === 'concluded') info.error = this.error.message;
    return info;
  }
}

/**
 * Owns the jobs of one graph. Emits ('event', name, data) for QMP. Internal jobs are
 * tracked (so that shutdown can cancel them) but never listed or named.
 */
export class JobManager extends EventEmitter {
  private readonly jobs = new Map<string, Job>();
  private readonly internalJobs = new Set<Job>();
  private internalCounter = 0;

  constructor(readonly graph: BlockGraph) {
    super();
  }

  internalId(): string {
    return `#job${++this.internalCounter}`;
  }

  /** A job by id, including one still being set up (its id is taken). */
  get(id: string): Job | undefined {
    return this.jobs.get(id);
  }

  register(job: Job): void {
    if (job.internal) this.internalJobs.add(job);
    else {
      assert(!this.jobs.has(job.id), `duplicate job id ${job.id}`);
      this.jobs.set(job.id, job);
    }
  }

  unregister(job: Job): void {
    if (job.internal) this.internalJobs.delete(job);
    else if (this.jobs.get(job.id) === job) this.jobs.delete(job.id);
  }

  /** For job-* commands: QEMU's "Job not found". */
  find(id: string): Job {
    const j = this.jobs.get(id);
    if (!j || j.status === 'undefined') throw new NotFoundError(`Job not found`);
    return j;
  }

  /** For block-job-* commands: QEMU's "Block job 'x' not found". */
  findBlockJob(id: string): Job {
    const j = this.jobs.get(id);
    if (!j || j.status === 'undefined' || !j.isBlockJob) throw new NotFoundError(`Block job '${id}' not found`);
    return j;
  }

  /** All listed jobs, newest first as QEMU lists them (not those still being set up). */
  list(): Job[] {
    return [...this.jobs.values()].filter((j) => j.status !== 'undefined').reverse();
  }

  queryBlockJobs(): BlockJobInfo[] {
    return this.list()
      .filter((j) => j.isBlockJob)
      .map((j) => j.blockJobInfo());
  }

  queryJobs(): JobInfo[] {
    return this.list().map((j) => j.jobInfo());
  }

  /** Shutdown: force-cancels every job, internal ones included, and waits for them. */
  async cancelAll(): Promise<void> {
    const all = [...this.jobs.values(), ...this.internalJobs].filter((j) => j.status !== 'undefined');
    await Promise.all(all.map((j) => (j.isCompleted && j.status !== 'pending' ? j.done : j.cancel(true))));
    for (const j of [...this.jobs.values()]) if (j.status === 'concluded') j.dismiss();
  }
}
