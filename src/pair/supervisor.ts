// The pair supervisor: one process that drives a primary and a secondary `lockstep daemon`
// over QMP. It creates what is missing, runs the initial sync, starts replication in the
// right order (secondary first), exports the primary's disk to the user, takes consistent
// checkpoints (hold the guest's writes at the primary, checkpoint the secondary, release),
// watches both sides with a heartbeat, and fails over to the secondary when the primary dies.
//
// The daemons are either started here (one host) or already running and reached at their QMP
// addresses (two hosts; the supervisor then runs on the secondary's host or a third one, so
// that it outlives the primary). Between hosts every channel is TLS with x509 certificates
// verified on both ends: the supervisor's QMP connections and the primary's NBD forwarding;
// plain TCP to a non-loopback address needs `insecure`.
//
// This module owns the state and wires the parts: sides.ts (launch, calls, transport),
// stages.ts (the one stage transition table), checkpoint.ts (the barrier), liveness.ts
// (heartbeats), start.ts (a start's comparison, copy and replication), split-brain.ts and
// resolve.ts, adopt.ts and resume.ts (a restarted supervisor), failover.ts, bring-back.ts and
// reprotect.ts (re-protection), sync.ts and status.ts. The parts are functions over a narrow
// view of the supervisor each (its members they read and set), as core.ts's PairCore is.

import { EventEmitter } from 'node:events';
import { mkdirSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { errorMessage } from '../errors.js';
import { PairMetrics, RateMeter } from './metrics.js';
import { LOG_NODE, type SideLayout } from './setup.js';
import { markUpToDate, type PairDisk } from './disks.js';
import { StageMachine, type PairStage } from './stages.js';
import { callSide, checkFresh, checkTransport, launchSide, stopSide, type Side, type SideName } from './sides.js';
import { CheckpointQueue, ForwardError, refreshCounters, runCheckpoint, type CheckpointTimes } from './checkpoint.js';
import { Liveness } from './liveness.js';
import { startFailover } from './failover.js';
import { sideLost } from './side-lost.js';
import type { ByteRange, ResyncResult } from './sync.js';
import { buildSides, buildStatus, type PairStatus } from './status.js';
import type { PairCore } from './core.js';
import { PairOutputCommit } from './output-commit.js';
import type { PairLease } from './lease.js';
import { findDaemons, recordDaemons, removeDaemons } from './adopt.js';
import { adoptDaemons } from './resume.js';
import { otherSide, type SplitBrain } from './split-brain.js';
import type { LiveResyncResult, PassMark, ResyncProgress } from './reprotect.js';
import { ReturnState, runReprotect, scheduleReturn } from './bring-back.js';
import { watchPeerReturn } from './peer-return.js';
import { setUp, type StartCopy, type SyncRecord } from './start.js';
import { runResolve, type Resolved } from './resolve.js';
import { PAIR_DEFAULTS, longBoundMs, type PairOptions } from './options.js';
import type { SocketAddress } from '../util/socket-address.js';

export type { PairStage } from './stages.js';
export type { PairTls } from './sides.js';
export type { CheckpointTimes } from './checkpoint.js';
export type { PairStatus } from './status.js';
export { PAIR_DEFAULTS, type PairOptions } from './options.js';

const EXPORT_NAME = 'disk';

export class PairSupervisor extends EventEmitter implements PairCore {
  readonly metrics = new PairMetrics();
  // every stage change is recorded beside the daemons, for a supervisor that adopts them
  readonly stages = new StageMachine('starting', (_from, to) => {
    if (to !== 'stopped') recordDaemons(this);
  });
  primary: Side | null = null;
  secondary: Side | null = null;
  lastError: string | undefined;
  private timers: NodeJS.Timeout[] = [];
  private lastPauseMs: number | null = null;
  private changedAt = 0;
  private readonly liveness: Liveness;
  readonly disks: { primary: PairDisk | null; secondary: PairDisk | null } = { primary: null, secondary: null };
  readonly outputCommit = new PairOutputCommit(this, () => void this.checkpoint().catch(() => {}));
  lease: PairLease | null = null;
  /** what the last start decided about copying */
  lastSync: SyncRecord | null = null;
  /** what the last start's copy did: the extents it copied and the job's byte counters */
  lastResync: ResyncResult | null = null;
  /** a live resync running (the secondary's disk is inconsistent until it ends) */
  resyncProgress: ResyncProgress | null = null;
  /** what the last live re-protection copied */
  lastReprotect: LiveResyncResult | null = null;
  /** stage split-brain: what each side changed and what a resolve would copy */
  splitBrain: SplitBrain | null = null;
  /** what the last `resolve` did */
  lastResolve: Resolved | null = null;
  /** the live resync's rate (bytes/s since it began) */
  private readonly resyncMeter = new RateMeter();

  // ---- state the parts read and set (their host interfaces), not an API -------------------

  /** this supervisor wrote DATA/pair-daemons.json (started or adopted daemons) */
  recorded = false;
  /** the failover running or done (set: no second one) */
  failingOver: Promise<void> | null = null;
  /** the addresses the disk is served at */
  serving: string[] = [];
  /** degraded: the primary's changes since the last confirmed checkpoint */
  changedBytes: number | undefined;
  /** a resolve runs */
  resolving = false;
  /** a start's copy (or a resolve's) running: which side it writes, its progress */
  startCopy: StartCopy | null = null;
  /** the re-protection's timers, watch and resume point (bring-back.ts) */
  readonly returns: ReturnState;

  constructor(readonly opts: PairOptions) {
    super();
    const long = longBoundMs(opts);
    this.liveness = new Liveness(opts.heartbeatTimeoutMs, long, opts.log, (side) => void sideLost(this, side));
    this.returns = new ReturnState(opts.reprotectBackoffMs ?? 1000);
  }

  get stage(): PairStage {
    return this.stages.stage;
  }

  get log(): PairOptions['log'] {
    return this.opts.log;
  }

  get controlTimeoutMs(): number {
    return Math.max(2000, 4 * this.opts.heartbeatTimeoutMs);
  }

  call(side: Side, command: string, args?: Record<string, unknown>, timeoutMs = this.controlTimeoutMs): Promise<unknown> {
    return callSide(side, command, args, timeoutMs);
  }

  layout(dir: string | undefined, attached: boolean): SideLayout {
    return { dir: dir ?? this.opts.dataDir, local: !attached, ...(this.opts.dirtyExtentBytes !== undefined ? { dirtyExtentBytes: this.opts.dirtyExtentBytes } : {}), ...(this.opts.copyUnit !== undefined ? { copyUnit: this.opts.copyUnit } : {}) };
  }

  /** Where the secondary serves forwarded writes: a Unix socket on one host, TCP between two.
   *  `name`: the daemon that plays the secondary (the one started as primary once a
   *  failover's survivor is re-protected: its own socket beside its disk). */
  forwardAddress(name: SideName = 'secondary'): SocketAddress {
    const o = this.opts;
    if (name === 'primary') {
      // the old primary's `pair host` daemon holds server credentials too (tls0), and the
      // survivor's client ones (tls1): the same port as a secondary's, on its host
      const pq = o.primaryQmp;
      if (pq && 'host' in pq) return { type: 'inet', host: pq.host, port: PAIR_DEFAULTS.secondaryNbdPort };
      return { type: 'unix', path: join(o.primaryDir ?? o.dataDir, 'primary-nbd.sock') };
    }
    if (o.secondaryNbd) return { type: 'inet', host: o.secondaryNbd.host, port: o.secondaryNbd.port };
    const sq = o.secondaryQmp;
    if (sq && 'host' in sq) return { type: 'inet', host: sq.host, port: PAIR_DEFAULTS.secondaryNbdPort };
    return { type: 'unix', path: join(o.secondaryDir ?? o.dataDir, 'secondary-nbd.sock') };
  }

  // ---- start-up -----------------------------------------------------------------------

  async start(): Promise<void> {
    const o = this.opts;
    const forward = this.forwardAddress();
    await checkTransport(o, forward);
    mkdirSync(o.dataDir, { recursive: true });
    // daemons an earlier supervisor started here may still run and serve: adopt them
    if (this.oneHost) {
      const found = await findDaemons(o.dataDir, o.log, this.controlTimeoutMs);
      if (found && (await adoptDaemons(this, found))) return;
    }
    const pl = this.layout(o.primaryDir, o.primaryQmp !== undefined);
    const sl = this.layout(o.secondaryDir, o.secondaryQmp !== undefined);
    for (const l of [pl, sl]) if (l.local) mkdirSync(l.dir, { recursive: true });

    // both at once (a daemon's start-up is most of a pair's on a loaded host); each one
    // that started is recorded before anything else, so that none is left unknown
    const [sl0, pl0] = await Promise.allSettled([this.launch('secondary', o.secondaryQmp, sl), this.launch('primary', o.primaryQmp, pl)]);
    if (sl0.status === 'fulfilled') this.secondary = sl0.value;
    if (pl0.status === 'fulfilled') this.primary = pl0.value;
    recordDaemons(this);
    if (sl0.status === 'rejected') throw sl0.reason;
    if (pl0.status === 'rejected') throw pl0.reason;
    const p = pl0.value;
    const s = sl0.value;
    for (const side of [s, p]) if (!side.child) await checkFresh(side, side === s ? o.secondaryQmp! : o.primaryQmp!, this.controlTimeoutMs);
    await setUp(this, p, s);
  }

  /** The heartbeat and checkpoint timers. */
  startTimers(): void {
    const o = this.opts;
    this.timers.push(setInterval(() => void this.tick(), o.heartbeatIntervalMs));
    if (o.checkpointIntervalMs > 0) {
      this.timers.push(
        setInterval(() => {
          if (this.stages.policy.checkpoints && !this.checkpoints.busy) void this.checkpoint().catch(() => {});
        }, o.checkpointIntervalMs),
      );
    }
  }

  stopTimers(): void {
    for (const t of this.timers) clearInterval(t);
    this.timers = [];
  }

  async launch(name: SideName, attach: SocketAddress | undefined, layout: SideLayout): Promise<Side> {
    return this.watch(await launchSide(name, attach, layout, this.opts.dataDir, this.opts.tls));
  }

  /** Both daemons are started here (not attached): they can be recorded and adopted. */
  get oneHost(): boolean {
    return this.opts.primaryQmp === undefined && this.opts.secondaryQmp === undefined;
  }

  /** Notices when a side's daemon exits or its QMP connection closes. */
  watch(side: Side): Side {
    side.child?.once('exit', (code, signal) => {
      side.alive = false;
      this.opts.log('warn', `the ${side.name} daemon exited`, { code, signal });
      void sideLost(this, side);
    });
    side.qmp.on('close', () => {
      if (side.alive) {
        side.alive = false;
        void sideLost(this, side);
      }
    });
    return side;
  }

  /** Serves `node` of `side` on the user's addresses under the export name "disk". */
  async serve(side: Side, node: string): Promise<void> {
    const o = this.opts;
    const addrs: Array<{ type: 'unix' | 'inet'; data: Record<string, string> }> = [];
    const sock = o.nbdSocket ?? join(side.layout.dir, 'disk.sock');
    // a stale socket of the dead side on this host would make the listen fail
    if (side.layout.local) rmSync(sock, { force: true });
    addrs.push({ type: 'unix', data: { path: sock } });
    if (o.nbdPort) addrs.push({ type: 'inet', data: { host: o.nbdHost ?? '127.0.0.1', port: String(o.nbdPort) } });
    this.serving = [];
    for (const [i, addr] of addrs.entries()) {
      // one NBD server per daemon: the first address starts it, the others are added to it
      await this.call(side, i === 0 ? 'nbd-server-start' : 'x-nbd-server-listen', { addr });
      this.serving.push(
        addr.type === 'unix'
          ? `nbd+unix:///${EXPORT_NAME}?socket=${addr.data.path}`
          : `nbd://${addr.data.host}:${addr.data.port}/${EXPORT_NAME}`,
      );
    }
    await this.call(side, 'block-export-add', { type: 'nbd', id: EXPORT_NAME, 'node-name': node, name: EXPORT_NAME, writable: true });
  }

  // ---- checkpoints ----------------------------------------------------------------------

  /** A consistent checkpoint: hold the guest's writes, checkpoint the secondary, release.
   *  Requests are serialised (checkpoint.ts): one barrier at a time, latecomers share the next. */
  checkpoint(): Promise<CheckpointTimes> {
    return this.checkpoints.request();
  }

  /** The barrier running, if any. */
  get checkpointRunning(): Promise<CheckpointTimes> | null {
    return this.checkpoints.current;
  }

  insideBarrier(p: Side): Promise<void> {
    return this.outputCommit.release(p);
  }

  private readonly checkpoints = new CheckpointQueue(async (): Promise<CheckpointTimes> => {
    if (!this.stages.policy.checkpoints) throw new Error(`no checkpoint in stage ${this.stage}`);
    if (this.failingOver) throw new Error('no checkpoint while failing over');
    const times = await runCheckpoint(this).catch((e: unknown) => {
      if (e instanceof ForwardError) this.forwardFailed(e);
      throw e;
    });
    this.lastPauseMs = times.pauseMs;
    // after the release (the guest does not wait on it): the secondary's persisted UpToDate (its
    // disk by the daemon's side name: after a re-protection the roles are swapped)
    await markUpToDate(this, this.secondary ? this.disks[this.secondary.name] : null).catch((e: unknown) => this.opts.log('warn', `cannot record the secondary's checkpoint in its generation record: ${errorMessage(e)}`));
    await refreshCounters(this).catch(() => {});
    this.emit('checkpoint', times);
    return times;
  });

  // ---- liveness and failure handling ---------------------------------------------------

  /** The primary failed to forward a write (a refused request, a broken link): the secondary
   *  lacks a write the primary acknowledged, so no checkpoint can confirm it again. Whatever
   *  the cause, and even though its daemon still answers, it is handled as a lost secondary:
   *  the pair goes degraded (flushes complete on the primary alone) and the secondary is
   *  brought back and resynced from the two change records (bring-back.ts). */
  private forwardFailed(e: ForwardError): void {
    const s = this.secondary;
    if (this.stage !== 'protected' || !s?.alive) return;
    this.opts.log('error', `${e.message}: taking the secondary out of the pair to bring it back`);
    void sideLost(this, s, "the primary's forward to the secondary failed");
  }

  private async tick(): Promise<void> {
    this.liveness.tick([this.primary, this.secondary]);
    this.metrics.heartbeatsLate = { primary: this.liveness.records.primary.late, secondary: this.liveness.records.secondary.late };
    this.metrics.heartbeatMaxLateSeconds = {
      primary: this.liveness.records.primary.maxLateMs / 1000,
      secondary: this.liveness.records.secondary.maxLateMs / 1000,
    };
    if (this.primary) this.metrics.heartbeatAgeSeconds = (Date.now() - this.primary.lastAnswer) / 1000;
    if (this.stage === 'degraded' && Date.now() - this.changedAt >= 1000) {
      this.changedAt = Date.now();
      await this.recordChanged().catch(() => {});
    }
  }

  /** Why the secondary's disk may not serve: a resync onto it has not ended. */
  inconsistentReason(): string {
    const r = this.resyncProgress;
    const pct = r && r.total > 0 ? Math.floor((100 * r.done) / r.total) : 0;
    return `the secondary's disk is inconsistent (resync ${pct}% done)`;
  }

  /** The side whose daemon plays the primary (named by the side it was started as). */
  get primarySide(): SideName {
    if (this.primary) return this.primary.name;
    // a survivor adopted after a failover: the other side played the primary
    return this.secondary ? otherSide(this.secondary.name) : 'primary';
  }

  /** The side whose daemon was started as `name` (whichever role it plays now). */
  sideNamed(name: SideName): Side | null {
    return [this.primary, this.secondary].find((x) => x?.name === name) ?? null;
  }

  /** Where the running live resync stands, or the interrupted one stood (its pass, extents
   *  and the flushed mark) while a later attempt may resume it. */
  get resyncMark(): { session: string; mark: PassMark } | null {
    return this.returns.interrupted;
  }

  /** The file where a degraded pair lists what changed since the last confirmed checkpoint. */
  get changedRegionsFile(): string {
    return join(this.opts.dataDir, 'changed-regions.json');
  }

  /** Reads the primary's changed regions and writes them where a re-protection will look. */
  async recordChanged(): Promise<void> {
    const p = this.primary;
    if (!p || !p.alive) return;
    let list = (await this.call(p, 'x-query-replication-changed')) as Array<{ bytes: number }>;
    if (p.name === 'secondary') {
      // a failover's survivor as the primary never had a forwarding filter to count its
      // changes: its dirty log holds them (everything since the failover, and its commit)
      const r = (await this.call(p, 'x-dirty-log-query', { 'node-name': LOG_NODE[p.name] })) as { granularity: number; 'dirty-bytes': number; extents: ByteRange[] };
      list = [{ 'node-name': LOG_NODE[p.name], granularity: r.granularity, bytes: r['dirty-bytes'], regions: r.extents } as { bytes: number }];
    }
    this.changedBytes = list.reduce((a, x) => a + x.bytes, 0);
    this.metrics.changedBytes = this.changedBytes;
    this.changedAt = Date.now();
    const tmp = `${this.changedRegionsFile}.tmp`;
    writeFileSync(tmp, JSON.stringify({ time: new Date().toISOString(), nodes: list }, null, 1) + '\n');
    // rename: a reader never sees half a file
    renameSync(tmp, this.changedRegionsFile);
  }

  // ---- the operator's commands (control.ts) and the parts that run them -------------------

  /** Fails over to the secondary and serves the recovered disk (failover.ts). */
  failover(reason = 'requested'): Promise<void> {
    return startFailover(this, reason);
  }

  /**
   * Re-protects a degraded pair now: brings the secondary back (restarts its daemon here, or
   * reaches it again on its host), resyncs it live from the two change records while the
   * primary serves, and resumes replication (bring-back.ts, reprotect.ts). Resolves once protected.
   */
  reprotect(): Promise<void> {
    return runReprotect(this);
  }

  /** Ends a split brain keeping `keep`'s disk, the other one saved first (resolve.ts). */
  resolve(keep: string): Promise<Resolved> {
    return runResolve(this, keep);
  }

  /** After a failover across two hosts: re-protect once the failed side answers (peer-return.ts). */
  watchPeerReturn(): void {
    watchPeerReturn(this);
  }

  /** A lost secondary is brought back after the next backoff delay (bring-back.ts). */
  scheduleReturn(): void {
    scheduleReturn(this);
  }

  /** Process ids of the daemons this supervisor started (none for attached daemons). */
  pids(): { primary?: number; secondary?: number } {
    const out: { primary?: number; secondary?: number } = {};
    const p = this.primary?.child?.pid ?? this.primary?.pid;
    const s = this.secondary?.child?.pid ?? this.secondary?.pid;
    if (p !== undefined) out.primary = p;
    if (s !== undefined) out.secondary = s;
    return out;
  }

  /** Kills the primary daemon with SIGKILL (the demo's and tests' simulated crash). */
  crashPrimary(): void {
    const c = this.primary?.child;
    const pid = this.primary?.pid;
    if (c) c.kill('SIGKILL');
    else if (pid !== undefined) process.kill(pid, 'SIGKILL');
    else throw new Error('the primary daemon was not started by this supervisor');
  }

  // ---- status and shutdown ----------------------------------------------------------

  status(): PairStatus {
    const rp = this.resyncProgress;
    const resync = rp ? { ...rp, 'bytes-per-second': Math.round(this.resyncMeter.sample(rp, rp.done, Date.now())), reason: this.inconsistentReason() } : undefined;
    const sb = this.splitBrain;
    const sc = this.startCopy;
    const copy = resync
      ? { done: resync.done, total: resync.total, 'bytes-per-second': resync['bytes-per-second'], 'eta-seconds': resync['eta-seconds'], target: otherSide(this.primarySide) }
      : sc
        ? { done: sc.done, total: sc.total, 'bytes-per-second': Math.round(this.resyncMeter.sample(sc, sc.done, Date.now())), 'eta-seconds': sc['eta-seconds'], target: sc.target }
        : null;
    const primarySide = this.primarySide;
    return buildStatus({
      stage: this.stage,
      primarySide,
      metrics: this.metrics,
      lastPauseMs: this.lastPauseMs,
      primaryLastAnswer: this.primary ? this.primary.lastAnswer : null,
      serving: this.serving,
      changedBytes: this.changedBytes,
      changedRegionsFile: this.changedRegionsFile,
      lastError: this.lastError,
      heartbeats: {
        primary: { late: this.liveness.records.primary.late, 'max-late-ms': this.liveness.records.primary.maxLateMs },
        secondary: { late: this.liveness.records.secondary.late, 'max-late-ms': this.liveness.records.secondary.maxLateMs },
      },
      sync: this.lastSync,
      ...(resync ? { resync } : {}),
      ...(this.returns.peerWatch ? { waitingForPeer: this.returns.peerWatch.status() } : {}),
      lastReprotect: this.lastReprotect,
      sides: buildSides({
        stage: this.stage,
        primarySide,
        serving: this.serving.length > 0,
        meta: { primary: this.disks.primary?.meta, secondary: this.disks.secondary?.meta },
        ...(sb ? { splitChanged: sb['changed-bytes'] } : {}),
        ...(this.changedBytes !== undefined ? { degradedChanged: this.changedBytes } : {}),
        ...(copy ? { resync: { done: copy.done, total: copy.total, 'bytes-per-second': copy['bytes-per-second'], 'eta-seconds': copy['eta-seconds'] }, resyncTarget: copy.target } : {}),
      }),
      ...(sb ? { splitBrain: { reason: sb.reason, 'changed-bytes': sb['changed-bytes'], 'diverged-bytes': sb['diverged-bytes'], commands: sb.commands } } : {}),
      disks: Object.fromEntries(
        (['primary', 'secondary'] as const).map((n) => {
          const m = this.disks[n]?.meta;
          return [n, m ? { generation: m.current, bitmap: m.bitmap, consistent: m.consistent, role: m.role } : null];
        }),
      ),
    });
  }

  async stop(): Promise<void> {
    this.stages.to('stopped');
    this.returns.stop();
    this.lease?.stop();
    this.stopTimers();
    await this.checkpoints.current?.catch(() => {});
    // the daemon's own flush at quit would otherwise wait for a checkpoint that never comes
    // (and the daemon be SIGKILLed 5 s later)
    const p = this.primary;
    if (p?.alive) await this.outputCommit.disable(p).catch(() => {});
    this.liveness.close();
    for (const side of [this.primary, this.secondary]) if (side) await stopSide(side, 2000);
    // the daemons are gone: nothing to adopt
    if (this.oneHost && this.recorded) removeDaemons(this.opts.dataDir);
    await this.returns.reprotecting?.catch(() => {});
  }
}
