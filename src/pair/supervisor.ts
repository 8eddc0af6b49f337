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
// (heartbeats), failover.ts, sync.ts and status.ts.

import { EventEmitter } from 'node:events';
import { mkdirSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { errorMessage } from '../errors.js';
import { PairMetrics, RateMeter } from './metrics.js';
import { DISK_NODE, LOG_NODE, OVERLAYS, PRIMARY_LOG, addPrimaryDisk, addPrimaryQuorum, buildSecondary, ensureImage, forwardNode, type SideLayout } from './setup.js';
import { DISK_FILE, PairDiskError, decideStart, goOnAlone, loadDisk, markInStep, markTarget, markUpToDate, outdatePeer, refusal, saveDisk, type PairDisk } from './disks.js';
import type { PairSideName, SyncDecision } from './generations.js';
import { StageMachine, type PairStage } from './stages.js';
import { callSide, checkFresh, checkTransport, launchSide, stopSide, type PairTls, type Side, type SideName } from './sides.js';
import { CheckpointQueue, refreshCounters, runCheckpoint, type CheckpointTimes } from './checkpoint.js';
import { Liveness } from './liveness.js';
import { runFailover } from './failover.js';
import { resync, unionExtents, type ByteRange, type ResyncResult } from './sync.js';
import { buildSides, buildStatus, type PairStatus } from './status.js';
import type { PairCore } from './core.js';
import { PairOutputCommit } from './output-commit.js';
import { PairLease } from './lease.js';
import { PairAdoptError, findDaemons, removeDaemons, retire, writeDaemons, type Found, type FoundDaemon } from './adopt.js';
import { daemonLogPath } from './sides.js';
import { ResolveError, checkUnfenced, otherSide, saveDisk as saveSplitDisk, splitBrainInfo, type SavedDisk, type SideRecords, type SplitBrain } from './split-brain.js';
import { Backoff, ReprotectRefused, cleanUpResync, clipExtents, detachReplication, liveResync, startReplication, type LiveResyncResult, type PassMark, type ResyncProgress } from './reprotect.js';
import { newId } from './generations.js';
import { PeerReturnWatch } from './peer-return.js';
import { fenceServed, heldNodes, resetDaemon } from './returning.js';
import type { SocketAddress } from '../util/socket-address.js';

export type { PairStage } from './stages.js';
export type { PairTls } from './sides.js';
export type { CheckpointTimes } from './checkpoint.js';
export type { PairStatus } from './status.js';

export interface PairOptions {
  dataDir: string;
  /** virtual size of the disk in bytes (used when the images are created) */
  size: number;
  checkpointIntervalMs: number;
  heartbeatIntervalMs: number;
  heartbeatTimeoutMs: number;
  /** a side whose silence cannot mean a cut link (a daemon started here, any secondary) is
   *  lost only after this long without an answer; before, it is late (default: 10 timeouts,
   *  at least 5 s) */
  heartbeatLostMs?: number;
  failover: 'auto' | 'manual';
  /** where the user's disk is served, on the serving side's host: a Unix socket (default
   *  DIR/disk.sock of the serving side) and, with nbdPort, TCP */
  nbdSocket?: string;
  nbdHost?: string;
  nbdPort?: number;
  /** attach to daemons already running instead of starting them */
  primaryQmp?: SocketAddress;
  secondaryQmp?: SocketAddress;
  /** data directories on each side's host (default: dataDir) */
  primaryDir?: string;
  secondaryDir?: string;
  /** where the secondary serves forwarded writes, as the primary reaches it (two hosts) */
  secondaryNbd?: { host: string; port: number };
  tls?: PairTls;
  /** allow plain TCP to non-loopback addresses */
  insecure?: boolean;
  log: (level: 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>) => void;
  /** the operator's word on which disk is current (a full sync from it); needed when a disk
   *  has no generation record, or to settle a split brain */
  forceCurrent?: PairSideName;
  /** output commit: a flush or FUA write completes once a checkpoint covers it (default on;
   *  off for COLO with a VM, whose outputs are held elsewhere) */
  flushCommit?: boolean;
  /** the primary's write lease, ms (default: the heartbeat timeout; 0 = no lease) */
  leaseMs?: number;
  /** writes once the primary's lease ran out: held until renewed (default) or EIO (lease.ts) */
  onLeaseExpiry?: import('./lease.js').PairLeaseExpiry;
  /** a lost secondary is brought back and resynced while the primary serves (default on):
   *  restarted here on one host, its QMP address retried on two */
  reprotect?: boolean;
  /** the first delay before bringing a lost secondary back, ms (doubles up to 30 s; default 1000) */
  reprotectBackoffMs?: number;
  /** a live resync's copy rate, bytes/s (the job's speed; default unlimited) */
  resyncRate?: number;
  /** the control socket `lockstep pair` serves (named in what a split brain says to run;
   *  default DATA/pair.sock) */
  control?: string;
  /** a live resync flushes the target and persists its mark after every this many bytes
   *  copied: about what a resync whose target dies copies again (default 64 MiB) */
  resyncPieceBytes?: number;
  /** what each disk's dirty log persists before the first write into it (its extent-size;
   *  default DIRTY_EXTENT_SIZE, 4 MiB): after a crash the resync copies whole extents */
  dirtyExtentBytes?: number;
  copyUnit?: number; // the secondary's copy-before-write unit = its hidden disk's cluster size (setup.ts)
  /** progress of a copy (the initial sync, a failover's commit), for a terminal line */
  onProgress?: (done: number, total: number, etaSeconds: number | null, what?: 'initial sync' | 'resync' | 'failover commit' | 'split-brain save') => void;
}

export const PAIR_DEFAULTS = {
  size: 1024 ** 3,
  checkpointIntervalMs: 1000,
  heartbeatIntervalMs: 100,
  heartbeatTimeoutMs: 500,
  failover: 'auto' as const,
  nbdHost: '127.0.0.1',
  nbdPort: 10809,
  secondaryNbdPort: 10810,
};

const EXPORT_NAME = 'disk';

export class PairSupervisor extends EventEmitter implements PairCore {
  readonly metrics = new PairMetrics();
  // every stage change is recorded beside the daemons, for a supervisor that adopts them
  readonly stages = new StageMachine('starting', (_from, to) => {
    if (to !== 'stopped') this.recordDaemons();
  });
  primary: Side | null = null;
  secondary: Side | null = null;
  lastError: string | undefined;
  private timers: NodeJS.Timeout[] = [];
  /** this supervisor wrote DATA/pair-daemons.json (started or adopted daemons) */
  private recorded = false;
  private lastPauseMs: number | null = null;
  private failingOver: Promise<void> | null = null;
  private serving: string[] = [];
  private changedBytes: number | undefined;
  private changedAt = 0;
  private readonly liveness: Liveness;
  readonly disks: { primary: PairDisk | null; secondary: PairDisk | null } = { primary: null, secondary: null };
  readonly outputCommit = new PairOutputCommit(this, () => void this.checkpoint().catch(() => {}));
  lease: PairLease | null = null;
  /** what the last start decided about copying */
  lastSync: { kind: string; reason: string; source?: PairSideName } | null = null;
  /** what the last start's copy did: the extents it copied and the job's byte counters */
  lastResync: ResyncResult | null = null;
  /** a live resync running (the secondary's disk is inconsistent until it ends) */
  resyncProgress: ResyncProgress | null = null;
  /** what the last live re-protection copied */
  lastReprotect: LiveResyncResult | null = null;
  /** stage split-brain: what each side changed and what a resolve would copy */
  splitBrain: SplitBrain | null = null;
  /** what the last `resolve` did */
  lastResolve: { kept: PairSideName; saved: SavedDisk; copied: ResyncResult | null } | null = null;
  private resolving = false;
  /** a start's copy (or a resolve's) running: which side it writes, its progress */
  private startCopy: { target: PairSideName; done: number; total: number; 'eta-seconds': number | null } | null = null;
  /** the live resync's rate (bytes/s since it began) */
  private readonly resyncMeter = new RateMeter();
  private readonly backoff: Backoff;
  private returnTimer: NodeJS.Timeout | null = null;
  private reprotecting: Promise<void> | null = null;
  /** a live resync whose target died: where it stood (the primary's daemon still tracks the
   *  writes since that pass began), for the next attempt onto the same disk to resume */
  private interrupted: { session: string; mark: PassMark } | null = null;
  /** after a failover across two hosts: waiting for the failed side's daemon to answer */
  private peerWatch: PeerReturnWatch | null = null;
  /** a split brain found while the survivor served, resolved keeping the survivor's disk: the
   *  generations it was found at (the re-protection then copies from that disk) */
  private resolvedKeep: { keep: PairSideName; at: { primary: string; secondary: string } } | null = null;

  constructor(readonly opts: PairOptions) {
    super();
    const long = opts.heartbeatLostMs ?? Math.max(5000, 10 * opts.heartbeatTimeoutMs);
    this.liveness = new Liveness(opts.heartbeatTimeoutMs, long, opts.log, (side) => void this.sideDied(side));
    this.backoff = new Backoff(opts.reprotectBackoffMs ?? 1000);
  }

  get stage(): PairStage {
    return this.stages.stage;
  }

  get log(): PairOptions['log'] {
    return this.opts.log;
  }

  private get controlTimeoutMs(): number {
    return Math.max(2000, 4 * this.opts.heartbeatTimeoutMs);
  }

  call(side: Side, command: string, args?: Record<string, unknown>, timeoutMs = this.controlTimeoutMs): Promise<unknown> {
    return callSide(side, command, args, timeoutMs);
  }

  private layout(dir: string | undefined, attached: boolean): SideLayout {
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
      if (found && (await this.adopt(found))) return;
    }
    const pl = this.layout(o.primaryDir, o.primaryQmp !== undefined);
    const sl = this.layout(o.secondaryDir, o.secondaryQmp !== undefined);
    for (const l of [pl, sl]) if (l.local) mkdirSync(l.dir, { recursive: true });

    // both at once (a daemon's start-up is most of a pair's on a loaded host); each one
    // that started is recorded before anything else, so that none is left unknown
    const [sl0, pl0] = await Promise.allSettled([this.launch('secondary', o.secondaryQmp, sl), this.launch('primary', o.primaryQmp, pl)]);
    if (sl0.status === 'fulfilled') this.secondary = sl0.value;
    if (pl0.status === 'fulfilled') this.primary = pl0.value;
    this.recordDaemons();
    if (sl0.status === 'rejected') throw sl0.reason;
    if (pl0.status === 'rejected') throw pl0.reason;
    const p = pl0.value;
    const s = sl0.value;
    for (const side of [s, p]) if (!side.child) await checkFresh(side, side === s ? o.secondaryQmp! : o.primaryQmp!, this.controlTimeoutMs);
    await this.setUp(p, s);
  }

  /** On two fresh daemons (started as primary, as secondary): the images, the generations
   *  compared, the graphs, then the copy and replication, or stage split-brain. */
  private async setUp(p: Side, s: Side): Promise<void> {
    const o = this.opts;
    const forward = this.forwardAddress();
    const tls = o.tls;
    // the disks are kept when they exist; the overlays are always recreated empty
    const created: Record<string, boolean> = {};
    for (const [side, name, keep] of [
      [s, 'secondary.qcow2', true],
      [s, 'active.qcow2', false],
      [s, 'hidden.qcow2', false],
      [p, 'primary.qcow2', true],
    ] as const) {
      const r = await ensureImage(side.qmp, side.layout, name, o.size, keep);
      created[name] = r === 'created';
      if (r === 'created') o.log('info', `created ${name}`, { side: side.name, dir: side.layout.dir, size: o.size });
    }
    // the generations decide, before anything is copied, whether and which way to copy
    const pd = (this.disks.primary = await loadDisk(this, p, 'primary', created['primary.qcow2']!, o.size));
    const sd = (this.disks.secondary = await loadDisk(this, s, 'secondary', created['secondary.qcow2']!, o.size));
    const first = decideStart(pd, sd, o.forceCurrent);
    // a split brain is not refused outright: the disks are opened (nothing is served or
    // copied) so that what each side changed can be reported and a resolve can copy
    const refused = first.kind === 'split-brain' ? null : refusal(first);
    if (refused) {
      this.lastSync = { kind: first.kind, reason: first.reason };
      throw refused;
    }
    if (forward.type === 'unix') rmSync(forward.path, { force: true });
    await buildSecondary(s.qmp, s.layout, forward, tls?.serverCreds);
    await addPrimaryDisk(p.qmp, p.layout);
    const records = first.kind === 'incremental' || first.kind === 'split-brain' ? await this.readRecords(p, s) : null;
    // a survivor of an unfenced failover whose old primary changed anything: split brain too
    const decision = records ? checkUnfenced(first, pd.meta, sd.meta, records) : first;
    this.lastSync = { kind: decision.kind, reason: decision.reason, ...('source' in decision ? { source: decision.source } : {}) };
    if (decision.kind === 'split-brain') {
      this.enterSplitBrain(decision.reason, records!);
      return;
    }
    o.log('info', `disks compared: ${decision.kind === 'none' ? 'nothing to copy' : `${decision.kind} sync from the ${'source' in decision ? decision.source : ''} disk`}`, { reason: decision.reason });
    await this.protect(decision, records);
  }

  /** Each side's change record (its dirty log as the daemon holds it now). */
  private async readRecords(p: Side, s: Side): Promise<SideRecords> {
    const [pr, sr] = await Promise.all(
      ([[p, 'primary'], [s, 'secondary']] as const).map(async ([side, n]) => (await side.qmp.execute('x-dirty-log-query', { 'node-name': LOG_NODE[n] })) as { extents: ByteRange[]; 'dirty-bytes': number }),
    );
    return { primary: { extents: pr!.extents, bytes: pr!['dirty-bytes'] }, secondary: { extents: sr!.extents, bytes: sr!['dirty-bytes'] } };
  }

  /** Stage split-brain: nothing copied, the operator told what to run. Nothing served at
   *  start; found when the failed side came back, the survivor (`serving`) serves on. */
  private enterSplitBrain(reason: string, records: SideRecords, serving?: SideName): void {
    const sb = (this.splitBrain = splitBrainInfo(reason, records, this.opts.control ?? join(this.opts.dataDir, 'pair.sock')));
    this.stages.to('split-brain');
    const what = serving
      ? `Neither disk was changed; the ${serving} daemon serves on (its clients keep their connections), the ${otherSide(serving)} disk serves no writes.`
      : 'Neither disk was changed and nothing is served.';
    this.lastError = `split brain: ${reason}. ${what} Keep one with \`lockstep pair resolve --keep primary|secondary\` (the other disk is saved first)`;
    this.opts.log('error', this.lastError, { 'changed-bytes': sb['changed-bytes'], 'diverged-bytes': sb['diverged-bytes'], run: sb.commands.map((c) => c.replace(/\s+#.*$/, '')) });
  }

  /**
   * Ends a split brain: saves the other side's whole disk as it is (split-brain.ts), then
   * copies the union of the two change records from the kept side onto it and protects the
   * pair as a start would. Resolves with what was saved and copied.
   */
  async resolve(keepText: string): Promise<{ kept: PairSideName; saved: SavedDisk; copied: ResyncResult | null }> {
    if (keepText !== 'primary' && keepText !== 'secondary') throw new ResolveError('EINVAL', `--keep: expected primary or secondary, got '${keepText}'`);
    const keep: PairSideName = keepText;
    if (this.resolving) throw new ResolveError('EREFUSED', 'a resolve is already running');
    const sb = this.splitBrain;
    if (this.stage !== 'split-brain' || !sb) throw new ResolveError('ENOSPLIT', `nothing to resolve: the pair is ${this.stage}, not in split brain`);
    const drop = otherSide(keep);
    const kd = this.disks[keep];
    const dd = this.disks[drop];
    if (!kd?.meta || !dd?.meta) throw new ResolveError('EREFUSED', 'a disk has no generation record');
    if (!kd.meta.consistent) throw new ResolveError('EREFUSED', `the ${keep} disk is inconsistent (a resync into it or a failover commit did not finish): it cannot be kept`);
    for (const d of [kd, dd]) if (!d.side.alive) throw new ResolveError('EREFUSED', `the ${d.name} daemon is not running: start the pair again`);
    // found when the failed side came back: the survivor serves (see enterSplitBrain)
    const survivor = this.serving.length > 0 ? this.primary : null;
    this.resolving = true;
    try {
      if (survivor) return (this.lastResolve = keep === survivor.name ? await this.resolveServing(keep, dd, sb) : await this.resolveAfresh(keep, survivor));
      return await this.resolveAtStart(keep, dd, sb);
    } finally {
      this.resolving = false;
    }
  }

  /** A split brain with nothing served: the other disk saved, then the union of both records
   *  copied from the kept one, and the pair protected as a start does. */
  private async resolveAtStart(keep: PairSideName, dd: PairDisk, sb: SplitBrain): Promise<{ kept: PairSideName; saved: SavedDisk; copied: ResyncResult | null }> {
    const drop = dd.name;
    const o = this.opts;
    o.log('warn', `resolving the split brain: keeping the ${keep} disk; saving the ${drop} disk first`);
    const saved = await saveSplitDisk(this, dd.side, drop, o.size, { primary: this.disks.primary?.meta ?? null, secondary: this.disks.secondary?.meta ?? null }, sb);
    o.log('info', `saved the ${drop} disk as it was`, { image: saved.image, description: saved.description, data: saved['data-bytes'] });
    const reason = `split brain resolved: the ${keep} disk kept, the ${drop} disk saved in ${saved.image}`;
    this.lastSync = { kind: 'incremental', source: keep, reason };
    this.lastError = undefined;
    // from here the copy's progress is what the status shows (a failed copy leaves the target
    // inconsistent: the next start refuses it as a source, see docs/replication.md)
    this.splitBrain = null;
    await this.protect({ kind: 'incremental', source: keep, reason }, { primary: { extents: sb.extents, bytes: sb['diverged-bytes'] }, secondary: { extents: [], bytes: 0 } });
    this.lastResolve = { kept: keep, saved, copied: this.lastResync };
    return this.lastResolve;
  }

  /**
   * A split brain found while the survivor serves, resolved keeping the other disk: the
   * survivor stops serving (its clients are cut off; their history is the one the operator
   * discards, saved whole below before anything is copied), both daemons' graphs are taken
   * down and set up as at start, which finds the split brain again with nothing served, and
   * the resolve goes on as at start.
   */
  private async resolveAfresh(keep: PairSideName, survivor: Side): Promise<{ kept: PairSideName; saved: SavedDisk; copied: ResyncResult | null }> {
    const o = this.opts;
    o.log('warn', `resolving the split brain: keeping the ${keep} disk; the ${survivor.name} daemon stops serving (its clients are cut off) and the pair is set up again as at start`);
    for (const t of this.timers) clearInterval(t);
    this.timers = [];
    this.lease?.stop();
    this.lease = null;
    await this.outputCommit.disable(survivor).catch(() => {});
    const p = this.sideNamed('primary');
    const s = this.sideNamed('secondary');
    if (!p?.alive || !s?.alive) throw new ResolveError('EREFUSED', 'a daemon is not running: start the pair again');
    for (const side of [survivor, survivor === p ? s : p]) await resetDaemon(this, side);
    this.serving = [];
    this.splitBrain = null;
    this.primary = p;
    this.secondary = s;
    await this.setUp(p, s);
    const sb = this.splitBrain as SplitBrain | null;
    if (this.stage !== 'split-brain' || !sb) throw new Error(`set up again, the disks compared as ${this.lastSync?.kind ?? 'unknown'} (${this.lastSync?.reason ?? ''}): the pair went on as a start does`);
    return this.resolveAtStart(keep, this.disks[otherSide(keep)]!, sb);
  }

  /**
   * A split brain found while the survivor serves, resolved keeping the survivor's disk: the
   * other disk is saved on its host, its daemon's graph taken down, and it returns as the
   * survivor's secondary through the live resync (the union of both records, copied while
   * the survivor serves on), exactly as a lost secondary does.
   */
  private async resolveServing(keep: PairSideName, dd: PairDisk, sb: SplitBrain): Promise<{ kept: PairSideName; saved: SavedDisk; copied: ResyncResult | null }> {
    const o = this.opts;
    const drop = dd.name;
    o.log('warn', `resolving the split brain: keeping the ${keep} disk, which serves; saving the ${drop} disk first`);
    const saved = await saveSplitDisk(this, dd.side, drop, o.size, { primary: this.disks.primary?.meta ?? null, secondary: this.disks.secondary?.meta ?? null }, sb);
    o.log('info', `saved the ${drop} disk as it was`, { image: saved.image, description: saved.description, data: saved['data-bytes'] });
    const at = { primary: this.disks.primary?.meta?.current ?? '', secondary: this.disks.secondary?.meta?.current ?? '' };
    this.resolvedKeep = { keep, at };
    this.lastSync = { kind: 'incremental', source: keep, reason: `split brain resolved: the ${keep} disk kept, the ${drop} disk saved in ${saved.image}` };
    this.lastError = undefined;
    this.splitBrain = null;
    await resetDaemon(this, dd.side);
    this.stages.to('degraded');
    await this.reprotect();
    const r = this.lastReprotect!;
    const sum = (k: 'bytes' | 'dataBytes' | 'zeroedBytes' | 'skippedZeroBytes') => r.passes.reduce((a, x) => a + x[k], 0);
    return { kept: keep, saved, copied: { extents: r.union, bytes: sum('bytes'), dataBytes: sum('dataBytes'), zeroedBytes: sum('zeroedBytes'), skippedZeroBytes: sum('skippedZeroBytes') } };
  }

  /** From the compared disks to a protected pair: the copy the decision asks for, then replication. */
  private async protect(decision: SyncDecision, records: SideRecords | null): Promise<void> {
    const o = this.opts;
    const p = this.primary!;
    const s = this.secondary!;
    const pd = this.disks.primary!;
    const sd = this.disks.secondary!;
    const forward = this.forwardAddress();
    const tls = o.tls;
    this.stages.to('syncing');
    if (decision.kind === 'incremental' || decision.kind === 'full') {
      const toSecondary = decision.source === 'primary';
      // an incremental resync copies the union of both records: what the newer side changed
      // since the common generation, and what the older side changed that the newer never
      // had (its writes after the last checkpoint, which a failover discarded)
      let extents: ByteRange[] = [{ offset: 0, length: o.size }];
      if (decision.kind === 'incremental') extents = unionExtents(records!.primary.extents, records!.secondary.extents);
      await markTarget(this, toSecondary ? sd : pd);
      await p.qmp.execute('blockdev-add', { 'node-name': 'sync-peer', ...forwardNode(forward, tls?.clientCreds, 0) });
      const targetIsZero = decision.kind === 'full' && decision.targetIsZero;
      const what = decision.kind === 'full' ? 'initial sync' : 'resync';
      const [from, to] = toSecondary ? [PRIMARY_LOG, 'sync-peer'] : ['sync-peer', PRIMARY_LOG];
      const copy = (this.startCopy = { target: toSecondary ? ('secondary' as const) : ('primary' as const), done: 0, total: extents.reduce((a, r) => a + r.length, 0), 'eta-seconds': null as number | null });
      const progress: typeof o.onProgress = (done, total, eta, w) => {
        Object.assign(copy, { done, total, 'eta-seconds': eta });
        o.onProgress?.(done, total, eta, w);
      };
      try {
        this.lastResync = await resync(p.qmp, o.log, progress, from, to, extents, targetIsZero, what);
      } finally {
        this.startCopy = null;
      }
      await p.qmp.execute('blockdev-del', { 'node-name': 'sync-peer' });
    }
    await markInStep(this, pd, sd, 'source' in decision ? decision.source : 'primary');
    // the disks are equal (or were already): neither has changed since the new common point
    if (decision.kind !== 'none') for (const [side, n] of [[p, 'primary'], [s, 'secondary']] as const) await side.qmp.execute('x-dirty-log-clear', { 'node-name': LOG_NODE[n] });
    await addPrimaryQuorum(p.qmp);
    const ioTimeoutS = Math.max(1, Math.ceil((2 * o.heartbeatTimeoutMs) / 1000));
    await startReplication(p.qmp, s.qmp, { forward, clientCreds: tls?.clientCreds, ioTimeoutS });
    const leaseMs = o.leaseMs ?? o.heartbeatTimeoutMs;
    if (leaseMs > 0) {
      this.lease = new PairLease(this, leaseMs, o.heartbeatIntervalMs);
      await this.lease.start(p);
    }
    if (o.flushCommit !== false) await this.outputCommit.enable(p);
    await this.serve(p, DISK_NODE);
    this.stages.to('protected');
    o.log('info', 'replication is running', { serving: this.serving, forward: forward.type === 'unix' ? forward.path : `${forward.host}:${forward.port}`, tls: !!tls });
    this.startTimers();
  }

  private startTimers(): void {
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

  private async launch(name: SideName, attach: SocketAddress | undefined, layout: SideLayout): Promise<Side> {
    return this.watch(await launchSide(name, attach, layout, this.opts.dataDir, this.opts.tls));
  }

  /** Both daemons are started here (not attached): they can be recorded and adopted. */
  private get oneHost(): boolean {
    return this.opts.primaryQmp === undefined && this.opts.secondaryQmp === undefined;
  }

  /** Rewrites DATA/pair-daemons.json (adopt.ts): who the daemons are, the stage, the generations. */
  private recordDaemons(): void {
    if (!this.oneHost) return;
    const entry = (side: Side | null) => {
      const pid = side?.child?.pid ?? side?.pid;
      if (!side || !side.alive || pid === undefined) return null;
      return { pid, qmp: join(this.opts.dataDir, `${side.name}.qmp`), log: daemonLogPath(this.opts.dataDir, side.name) };
    };
    try {
      this.recorded = true;
      // by the side each daemon was started as; which one plays the primary beside
      const ps = this.primarySide;
      writeDaemons(this.opts.dataDir, {
        stage: this.stage,
        primary: entry(this.sideNamed('primary')),
        secondary: entry(this.sideNamed('secondary')),
        ...(ps === 'secondary' ? { 'primary-side': ps } : {}),
        generation: { primary: this.disks.primary?.meta?.current ?? null, secondary: this.disks.secondary?.meta?.current ?? null },
        serving: this.serving,
      });
    } catch (e) {
      this.opts.log('warn', `cannot write the daemons record: ${errorMessage(e)}`);
    }
  }

  /**
   * Takes over the daemons a dead supervisor left running and resumes in the stage it
   * recorded (adopt.ts found and checked them). false: none was adopted (they were still
   * starting up and are stopped now): the pair starts afresh.
   */
  private async adopt(found: Found): Promise<boolean> {
    const o = this.opts;
    const r = found.record;
    const alive = [found.primary, found.secondary].filter((d): d is FoundDaemon => d !== null);
    const retireAll = async (why: string): Promise<false> => {
      for (const d of alive) {
        o.log('warn', `${why}: stopping the ${d.name} daemon of the last run (pid ${d.pid})`);
        await retire(d);
      }
      removeDaemons(o.dataDir);
      return false;
    };
    // nothing was served yet: the generations decide again what to copy (a target the copy
    // had begun is marked inconsistent and is never a source)
    // (a split brain copied nothing either, and the next start finds it again; one found while
    // the survivor served loses its clients here, as a restart of that daemon would)
    if (r.stage === 'starting' || r.stage === 'syncing' || r.stage === 'split-brain' || r.stage === 'stopped') return retireAll(`the last run ended in stage ${r.stage}, before it served the disk`);
    // the failover killed the primary: only the survivor can serve
    // by role from here: the record names the daemons by the side they were started as
    const pn = r['primary-side'] ?? 'primary';
    const sn = otherSide(pn);
    const byRole = { primary: found[pn], secondary: found[sn] };
    if (r.stage === 'failed-over' && !byRole.secondary) return retireAll('the survivor of the last failover is gone');
    const layout = this.layout(undefined, false);
    const side = (d: FoundDaemon): Side => this.watch({ name: d.name, qmp: d.qmp, child: null, pid: d.pid, layout, lastAnswer: Date.now(), alive: true });
    const p = (this.primary = byRole.primary ? side(byRole.primary) : null);
    const s = (this.secondary = byRole.secondary ? side(byRole.secondary) : null);
    if (p) this.disks[pn] = await loadDisk(this, p, pn, false, o.size);
    if (s) this.disks[sn] = await loadDisk(this, s, sn, false, o.size);
    this.serving = r.serving;
    const pidOf = (n: 'primary' | 'secondary') => byRole[n]?.pid ?? r[n === 'primary' ? pn : sn]?.pid;
    if (r.stage === 'failed-over') {
      if (p) await retire(byRole.primary!);
      this.primary = null;
      this.stages.adopt('failed-over');
      o.log('info', `adopted the running survivor (pid ${pidOf('secondary')}), which serves the disk`, { serving: this.serving });
    } else if (p && s && r.stage === 'protected') {
      this.stages.adopt('protected');
      await this.resumePrimary(p);
      this.startTimers();
      let took = 'took a checkpoint';
      await this.checkpoint().catch((e: unknown) => (took = `the first checkpoint failed: ${errorMessage(e)}`));
      o.log('info', `adopted the running primary (pid ${p.pid}) and secondary (pid ${s.pid}); ${took}`, { serving: this.serving });
      return true;
    } else if (p && (r.stage === 'protected' || r.stage === 'degraded')) {
      if (s) await retire(byRole.secondary!);
      this.secondary = null;
      this.stages.adopt('degraded');
      await this.resumePrimary(p);
      // nothing left to fail over to: flushes complete on the primary's own disk
      await this.outputCommit.disable(p).catch(() => {});
      const pd = this.disks[pn];
      if (r.stage === 'protected' && pd) await goOnAlone(this, pd, 'primary');
      this.lastError = `the secondary daemon (pid ${pidOf('secondary')}) died while no supervisor ran: the primary keeps serving without protection`;
      await this.recordChanged().catch(() => {});
      o.log('warn', `adopted the running primary (pid ${p.pid}); the secondary is gone: degraded, the primary serves without protection`, { serving: this.serving });
    } else if (s && !p && (r.stage === 'protected' || r.stage === 'primary-lost')) {
      this.stages.adopt('primary-lost');
      o.log('warn', `adopted the running secondary (pid ${s.pid}); the primary (pid ${pidOf('primary')}) is gone`);
      this.startTimers();
      if (o.failover === 'auto') {
        await this.failover('the primary died while no supervisor ran').catch(() => {});
      } else {
        this.lastError = 'the primary died while no supervisor ran; failover is manual: run `lockstep pair failover`';
        o.log('error', this.lastError);
      }
      return true;
    } else {
      for (const d of alive) d.qmp.close();
      this.primary = this.secondary = null;
      throw new PairAdoptError(
        `cannot adopt the daemons of the last run: it recorded stage ${r.stage}, and the ${p ? `primary (pid ${p.pid})` : `secondary (pid ${s!.pid})`} is the only one running, which that stage cannot go on from. ` +
          `Nothing was changed. Stop it (kill ${alive.map((d) => d.pid).join(' ')}), then start the pair again: the disks' generations decide what is copied`,
      );
    }
    this.recordDaemons();
    this.startTimers();
    return true;
  }

  /** An adopted primary: its lease renewed again (writes stalled once it ran out), output commit as it was. */
  private async resumePrimary(p: Side): Promise<void> {
    const o = this.opts;
    // a supervisor killed inside a checkpoint's barrier left the guest's writes held: release
    // them (that checkpoint counts as failed; the next one is taken below)
    try {
      await this.call(p, 'block-io-release', { 'node-name': DISK_NODE });
      o.log('warn', 'released the I/O hold the dead supervisor left on the primary (it died inside a checkpoint)');
    } catch (e) {
      if (!/is not held/.test(errorMessage(e))) throw e;
    }
    const leaseMs = o.leaseMs ?? o.heartbeatTimeoutMs;
    if (leaseMs > 0) {
      this.lease = new PairLease(this, leaseMs, o.heartbeatIntervalMs);
      await this.lease.start(p);
    }
    await this.outputCommit.adopt(p);
  }

  private watch(side: Side): Side {
    side.child?.once('exit', (code, signal) => {
      side.alive = false;
      this.opts.log('warn', `the ${side.name} daemon exited`, { code, signal });
      void this.sideDied(side);
    });
    side.qmp.on('close', () => {
      if (side.alive) {
        side.alive = false;
        void this.sideDied(side);
      }
    });
    return side;
  }

  /** Serves `node` of `side` on the user's addresses under the export name "disk". */
  private async serve(side: Side, node: string): Promise<void> {
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

  insideBarrier(p: Side): Promise<void> {
    return this.outputCommit.release(p);
  }

  private readonly checkpoints = new CheckpointQueue(async (): Promise<CheckpointTimes> => {
    if (!this.stages.policy.checkpoints) throw new Error(`no checkpoint in stage ${this.stage}`);
    if (this.failingOver) throw new Error('no checkpoint while failing over');
    const times = await runCheckpoint(this);
    this.lastPauseMs = times.pauseMs;
    // after the release (the guest does not wait on it): the secondary's persisted UpToDate (its
    // disk by the daemon's side name: after a re-protection the roles are swapped)
    await markUpToDate(this, this.secondary ? this.disks[this.secondary.name] : null).catch((e: unknown) => this.opts.log('warn', `cannot record the secondary's checkpoint in its generation record: ${errorMessage(e)}`));
    await refreshCounters(this).catch(() => {});
    this.emit('checkpoint', times);
    return times;
  });

  // ---- liveness and failure handling ---------------------------------------------------

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

  private async sideDied(side: Side): Promise<void> {
    if (this.stage === 'stopped') return;
    if (side !== this.primary && side !== this.secondary) return; // a side already replaced
    // by role: after a re-protection that swapped roles the daemon started as secondary is the primary
    if (side === this.primary) {
      this.lease?.stop();
      if (this.stage === 'failed-over' || this.failingOver) return;
      if (this.stage === 'split-brain') {
        // the survivor that served through the split brain: nothing can take over (neither
        // disk is current); the split brain still waits for `resolve`
        this.serving = [];
        this.opts.log('error', `the ${side.name} daemon, which served during the split brain, died: nothing serves the disk`);
        return;
      }
      if (this.stage === 'resyncing') {
        // never fail over to a resync target: its disk is a mix of old and new regions
        this.stages.to('primary-lost');
        this.lastError = `the primary died during a resync; no failover: ${this.inconsistentReason()}`;
        this.opts.log('error', this.lastError);
        this.emit('primary-lost');
        return;
      }
      if (this.opts.failover === 'auto' && this.secondary?.alive) {
        await this.failover('the primary died').catch(() => {});
        return;
      }
      if (this.stage === 'protected') this.stages.to('primary-lost');
      this.lastError = this.secondary?.alive
        ? 'the primary died; failover is manual: run `lockstep pair failover`'
        : 'the primary died and the secondary is not running: nothing can serve the disk';
      this.opts.log('error', this.lastError);
      this.emit('primary-lost');
    } else if (this.stage === 'protected') {
      this.stages.to('degraded');
      this.lastError = 'the secondary died: the primary keeps serving without protection';
      this.opts.log('error', this.lastError);
      await this.checkpoints.current?.catch(() => {});
      // from here the primary's disk counts its changes against the secondary's generation,
      // and the secondary, which may only be cut off and still look current, is noted as not
      // outdated yet: persisted before any flush completes on the primary alone (the disks by
      // the daemons' side names: after a re-protection the roles are swapped)
      const pd = this.primary ? this.disks[this.primary.name] : null;
      const sd = this.disks[side.name];
      const peerGen = sd?.kept ? sd.meta?.current : undefined;
      if (pd) await goOnAlone(this, pd, 'primary', undefined, peerGen).catch((e: unknown) => this.opts.log('error', `cannot record the primary's new generation: ${errorMessage(e)}`));
      // nothing left to fail over to: flushes complete on the primary's own disk
      if (this.primary) await this.outputCommit.disable(this.primary).catch((e: unknown) => this.opts.log('error', `cannot turn flush commit off: ${errorMessage(e)}`));
      // then the peer is marked outdated if it answers (flushes do not wait on that)
      if (pd && sd) await outdatePeer(this, pd, side, DISK_FILE[side.name], this.opts.heartbeatTimeoutMs).catch(() => {});
      await this.recordChanged().catch((e: unknown) => this.opts.log('warn', `cannot read the changed regions: ${errorMessage(e)}`));
      this.emit('degraded');
      this.scheduleReturn();
    } else if (this.stage === 'resyncing') {
      // the live resync fails on its own (its peer is gone) and goes back to degraded
      this.opts.log('error', 'the secondary died during the resync');
    }
  }

  /** Why the secondary's disk may not serve: a resync onto it has not ended. */
  private inconsistentReason(): string {
    const r = this.resyncProgress;
    const pct = r && r.total > 0 ? Math.floor((100 * r.done) / r.total) : 0;
    return `the secondary's disk is inconsistent (resync ${pct}% done)`;
  }

  /** Brings a lost secondary back after the next backoff delay (logged), unless turned off. */
  private scheduleReturn(): void {
    if (this.opts.reprotect === false || this.returnTimer || this.stage !== 'degraded') return;
    const delay = this.backoff.next();
    const sn = this.primary ? otherSide(this.primary.name) : 'secondary';
    const how = (sn === 'secondary' ? this.opts.secondaryQmp : this.opts.primaryQmp) ? `reaching the ${sn} daemon again` : `restarting the ${sn} daemon`;
    this.opts.log('info', `${how} in ${delay} ms (attempt ${this.backoff.attempts})`);
    this.returnTimer = setTimeout(() => {
      this.returnTimer = null;
      void this.reprotect().catch(() => {});
    }, delay);
  }

  /**
   * Re-protects a degraded pair now: brings the secondary back (restarts its daemon here, or
   * reaches it again on its host), resyncs it live from the two change records while the
   * primary serves, and resumes replication (reprotect.ts). Resolves once protected.
   */
  reprotect(): Promise<void> {
    if (this.reprotecting) return this.reprotecting;
    if (this.stage === 'failed-over') {
      // run now (by hand, or the watch saw the peer answer): no more waiting
      this.peerWatch?.stop();
      this.peerWatch = null;
      try {
        this.swapRoles();
      } catch (e) {
        return Promise.reject(e);
      }
    }
    if (this.stage === 'protected') return Promise.resolve();
    if (this.stage !== 'degraded') return Promise.reject(new Error(`no re-protection in stage ${this.stage}`));
    if (this.returnTimer) clearTimeout(this.returnTimer);
    this.returnTimer = null;
    const run = this.bringBackSecondary().finally(() => {
      this.reprotecting = null;
    });
    this.reprotecting = run;
    run.catch((e: unknown) => {
      // with the primary gone the secondary's disk stays what the resync left: inconsistent
      if (this.primary?.alive) this.resyncProgress = null;
      if (this.stage === 'stopped') return;
      // a split brain found on the way: both daemons stay as they are for `resolve`
      if (this.stage === 'split-brain') return;
      // the generations refused (split brain, unrelated, the secondary newer): never retried
      const final = e instanceof PairDiskError || e instanceof ReprotectRefused;
      const msg = `re-protection failed: ${errorMessage(e)}`;
      if (final) this.lastError = msg;
      this.opts.log(final ? 'error' : 'warn', msg);
      const p = this.primary;
      // the primary died meanwhile: primary-lost already says why nothing serves
      if (!p?.alive) return;
      // a refused attempt is not retried: nothing to resume
      if (final) this.interrupted = null;
      void (async () => {
        await cleanUpResync(this, p, this.interrupted !== null);
        const s = this.secondary;
        // a secondary that still runs is half set up: start it afresh next time
        if (s?.alive && s.child) {
          s.alive = false;
          await stopSide(s, 1000);
        }
        if (this.stages.tryTo('degraded') && !final) this.scheduleReturn();
      })();
    });
    return run;
  }

  /**
   * After a failover: the survivor becomes the primary (as in COLO). It goes on serving its
   * one-child quorum under the same export and addresses (its clients keep their
   * connections); the failed side is brought back as its secondary and resynced live, as a
   * lost secondary is: the pair is degraded (the new primary alone) until then.
   */
  private swapRoles(): void {
    const survivor = this.secondary;
    if (!survivor?.alive) throw new Error('no re-protection: the survivor of the failover is not running');
    const old = this.primary;
    this.primary = survivor;
    this.secondary = old;
    // the old primary's lease was left to run out by the failover: the new primary gets its
    // own inside the barrier that starts replication
    this.lease?.stop();
    this.lease = null;
    // the failover is over (its promise stays set to refuse a second one meanwhile)
    this.failingOver = null;
    this.backoff.reset();
    this.stages.to('degraded');
    this.lastError = undefined;
    this.opts.log('info', `re-protecting after the failover: the ${survivor.name} daemon, which serves, becomes the primary; the ${otherSide(survivor.name)} disk returns as its secondary`);
  }

  /**
   * After a failover across two hosts (the failed side attached at a QMP address) with
   * re-protection on: wait for that side's daemon to answer, then re-protect as `lockstep
   * pair reprotect` does (peer-return.ts). On one host that command, or the next start, does it.
   */
  private watchPeerReturn(): void {
    const o = this.opts;
    const survivor = this.secondary;
    if (o.reprotect === false || !survivor || this.peerWatch) return;
    const failed = otherSide(survivor.name);
    const address = failed === 'primary' ? o.primaryQmp : o.secondaryQmp;
    if (!address) return;
    this.peerWatch = new PeerReturnWatch({
      side: failed,
      address,
      tls: o.tls,
      firstDelayMs: o.reprotectBackoffMs ?? 1000,
      timeoutMs: this.controlTimeoutMs,
      log: o.log,
      onAnswer: async () => {
        this.peerWatch = null;
        if (this.stage !== 'failed-over') return;
        // a failed attempt logs and retries by itself once begun; one that could not begin
        // (the survivor gone) is said here
        await this.reprotect().catch((e: unknown) => {
          if (this.stage === 'failed-over') o.log('error', `no re-protection: ${errorMessage(e)}`);
        });
      },
    });
    this.peerWatch.start();
  }

  /** The operator resolved the split brain found while the survivor served, keeping its disk:
   *  while both disks are still at the generations it was found at, copy from the kept one. */
  private resolvedDecision(): SyncDecision | null {
    const rk = this.resolvedKeep;
    if (!rk || this.disks.primary?.meta?.current !== rk.at.primary || this.disks.secondary?.meta?.current !== rk.at.secondary) return null;
    return { kind: 'incremental', source: rk.keep, reason: `split brain resolved: the ${rk.keep} disk kept` };
  }

  /** The side whose daemon plays the primary (named by the side it was started as). */
  get primarySide(): SideName {
    if (this.primary) return this.primary.name;
    // a survivor adopted after a failover: the other side played the primary
    return this.secondary ? otherSide(this.secondary.name) : 'primary';
  }

  private async bringBackSecondary(): Promise<void> {
    const o = this.opts;
    const p = this.primary;
    if (!p?.alive) throw new Error('the primary is not running');
    // the secondary's daemon is the one not playing the primary (swapped after a failover)
    const sn = otherSide(p.name);
    const pd = this.disks[p.name];
    if (!pd) throw new Error('the primary is not running');
    const old = this.secondary;
    if (old) {
      old.alive = false;
      if (old.child) await stopSide(old, 1000);
      else old.qmp.close();
    }
    const forward = this.forwardAddress(sn);
    const attach = sn === 'secondary' ? o.secondaryQmp : o.primaryQmp;
    const sl = this.layout(sn === 'secondary' ? o.secondaryDir : o.primaryDir, attach !== undefined);
    if (forward.type === 'unix') rmSync(forward.path, { force: true });
    const s = await this.launch(sn, attach, sl);
    this.secondary = s;
    // first of all, the returning secondary is marked outdated if that was not possible before
    if (pd.meta?.peerNotOutdated !== undefined && !(await outdatePeer(this, pd, s, DISK_FILE[sn], this.controlTimeoutMs))) {
      throw new Error('the secondary could not be marked outdated');
    }
    // a daemon on another host that ran on through a cut link still holds its graph: its
    // records are read where they are open, and the graph is taken down only once the
    // generations say its disk is the older one (returning.ts)
    const held = s.child ? [] : await heldNodes(this, s);
    let created = false;
    if (held.length === 0) created = (await ensureImage(s.qmp, s.layout, DISK_FILE[sn], o.size, true)) === 'created';
    const sd = (this.disks[sn] = await loadDisk(this, s, sn, created, o.size));
    // the generations are compared by disk (started as primary, as secondary), unless the
    // operator resolved this very split brain keeping the serving disk
    const resolved = this.resolvedDecision();
    const first = resolved ?? decideStart(this.disks.primary!, this.disks.secondary!, undefined);
    // a split brain is counted from the records below; anything else refused is refused here
    const refused = first.kind === 'split-brain' ? null : refusal(first);
    if (refused) throw refused;
    if ((first.kind === 'incremental' || first.kind === 'full') && first.source !== p.name) throw new ReprotectRefused(`the generations say the ${sn} disk is newer (${first.reason}): not copying over it while the ${p.name} daemon serves`);
    const build = async (): Promise<void> => {
      for (const n of [OVERLAYS[sn].active, OVERLAYS[sn].hidden]) await ensureImage(s.qmp, s.layout, n, o.size, false);
      await buildSecondary(s.qmp, s.layout, forward, o.tls?.serverCreds, sn);
    };
    let built = false;
    if (!resolved && (first.kind === 'incremental' || first.kind === 'split-brain')) {
      // the returning disk's record is in its dirty log: opened by building the disk as the
      // secondary (a fresh daemon), or open already (a daemon that ran on)
      if (held.length === 0) {
        await build();
        built = true;
      } else if (!held.includes(LOG_NODE[sn])) {
        throw new Error(`the ${sn} daemon holds block nodes (${held.slice(0, 5).join(', ')}) but not its disk's dirty log ${LOG_NODE[sn]}: restart it (lockstep pair host)`);
      }
      const records = await this.readRecords(this.sideNamed('primary')!, this.sideNamed('secondary')!);
      // a survivor of an unfenced failover whose old primary went on writing: split brain too
      const decision = first.kind === 'incremental' ? checkUnfenced(first, this.disks.primary!.meta, this.disks.secondary!.meta, records) : first;
      if (decision.kind === 'split-brain') {
        // nothing is copied, and the returning disk adds nothing more to its history
        if (held.length > 0 && (await fenceServed(this, s))) o.log('warn', `the ${sn} daemon still served its disk: fenced, it acknowledges no write until the split brain is resolved`);
        this.enterSplitBrain(decision.reason, records, p.name);
        throw new PairDiskError('ESPLITBRAIN', this.lastError!);
      }
    }
    if (held.length > 0) {
      o.log('warn', `the ${sn} daemon ran on with its old graph (${held.slice(0, 5).join(', ')}); its disk is the older one (${first.reason}): taking the graph down to build the disk as the secondary`);
      await resetDaemon(this, s);
    }
    // an interrupted resync onto this same disk (its record carries that attempt's session)
    // resumes: the rest of its pass above the persisted mark, and what was written since
    const was = this.interrupted;
    const rec = sd.meta?.resync;
    let resume: ByteRange[] | undefined;
    if (was && rec?.session === was.session && first.kind !== 'none') {
      // the persisted mark counts when it is of the pass that was running; otherwise that
      // pass is copied whole (it had not persisted anything: the barrier's remainder)
      const doneUpTo = rec.pass === was.mark.pass ? rec['done-up-to'] : (was.mark.extents[0]?.offset ?? 0);
      resume = clipExtents(was.mark.extents, doneUpTo);
    } else if (was) {
      o.log('info', `the interrupted resync is not resumed (the ${sn} disk is not the one it copied to): copying from the records`);
    }
    const session = was && resume ? was.session : newId();
    // pass numbers go on across the attempts of one session, so that a persisted mark is
    // never taken for a later attempt's pass of the same number
    const passBase = was && resume ? was.mark.pass + 1 : 0;
    // nothing to resume: the records name everything (a superset)
    if (!resume) this.interrupted = null;
    if (!built) await build();
    const decision = first;
    o.log('info', `the ${sn} daemon is back as the secondary: ${decision.kind === 'none' ? 'nothing to copy' : `${decision.kind} resync from the ${p.name} disk`}, while the ${p.name} daemon serves`, { reason: decision.reason });
    this.stages.to('resyncing');
    this.resyncProgress = { done: 0, total: 0, 'eta-seconds': null, pass: 0 };
    await markTarget(this, sd);
    await detachReplication(this, p);
    const ioTimeoutS = Math.max(1, Math.ceil((2 * o.heartbeatTimeoutMs) / 1000));
    this.lastReprotect = await liveResync(this, p, s, {
      forward,
      clientCreds: o.tls?.clientCreds,
      ioTimeoutS,
      full: decision.kind === 'full',
      size: o.size,
      speed: o.resyncRate,
      onProgress: o.onProgress,
      progress: this.resyncProgress,
      resume,
      pieceBytes: o.resyncPieceBytes,
      onDone: async (m, durable) => {
        const mark = { ...m, pass: passBase + m.pass };
        // a new pass's extents are kept in memory at once, none of it counted done: they hold
        // the writes drained from the tracking, which must not be lost if the persist fails
        const known = this.interrupted;
        if (!known || known.mark.pass !== mark.pass || known.mark.extents !== m.extents || known.session !== session) {
          this.interrupted = { session, mark: { ...mark, doneUpTo: mark.extents[0]?.offset ?? 0 } };
        }
        // then persisted first: the mark in memory never runs ahead of the one on the target's host
        if (durable && sd.meta) {
          const source = pd.meta?.current ?? '';
          await saveDisk(this, sd, { ...sd.meta, resync: { session, source, pass: mark.pass, 'done-up-to': mark.doneUpTo }, updated: new Date().toISOString() });
        }
        this.interrupted = { session, mark };
      },
      // flushes acknowledged from here on must wait for a checkpoint again
      insideBarrier: async () => {
        // a survivor that becomes the primary: its own lease from here (a lost secondary's
        // primary kept its lease all along)
        const leaseMs = o.leaseMs ?? o.heartbeatTimeoutMs;
        if (!this.lease && leaseMs > 0) {
          this.lease = new PairLease(this, leaseMs, o.heartbeatIntervalMs);
          await this.lease.start(p);
        }
        if (o.flushCommit !== false) await this.outputCommit.enable(p);
      },
    });
    if (this.stage !== 'resyncing') throw new Error(`the pair left the resync (now ${this.stage})`);
    this.interrupted = null;
    this.resolvedKeep = null;
    await markInStep(this, pd, sd, 'primary');
    this.resyncProgress = null;
    this.changedBytes = undefined;
    this.lastError = undefined;
    this.backoff.reset();
    this.stages.to('protected');
    const r = this.lastReprotect;
    o.log('info', 'protected again: the secondary is resynced and replication runs', {
      passes: r.passes.length,
      bytes: r.passes.reduce((a, x) => a + x.bytes, 0),
      barrierBytes: r.barrierBytes,
      pauseMs: r.pauseMs,
    });
    // a flush that waited during the step to protected gets its checkpoint now
    if (this.outputCommit.enabled) void this.checkpoint().catch(() => {});
    this.emit('protected', r);
  }

  /** The side whose daemon was started as `name` (whichever role it plays now). */
  private sideNamed(name: SideName): Side | null {
    return [this.primary, this.secondary].find((x) => x?.name === name) ?? null;
  }

  /** Where the running live resync stands, or the interrupted one stood (its pass, extents
   *  and the flushed mark) while a later attempt may resume it. */
  get resyncMark(): { session: string; mark: PassMark } | null {
    return this.interrupted;
  }

  /** The file where a degraded pair lists what changed since the last confirmed checkpoint. */
  get changedRegionsFile(): string {
    return join(this.opts.dataDir, 'changed-regions.json');
  }

  /** Reads the primary's changed regions and writes them where a re-protection will look. */
  private async recordChanged(): Promise<void> {
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

  /** Fails over to the secondary and serves the recovered disk. */
  failover(reason = 'requested'): Promise<void> {
    if (this.failingOver) return this.failingOver;
    // refused without touching last-error, which says what settles the split brain
    if (this.stage === 'split-brain') return Promise.reject(new Error('no failover in stage split-brain: neither disk is current; run `lockstep pair resolve --keep primary|secondary`'));
    const run = (async () => {
      if (!this.secondary?.alive) throw new Error('the secondary is not running');
      if (this.resyncProgress) throw new Error(`no failover: ${this.inconsistentReason()}`);
      if (!this.stages.policy.failover) throw new Error(`no failover in stage ${this.stage}`);
      const sd = this.disks[this.secondary.name];
      const m = sd?.meta;
      if (m && !m.consistent) {
        throw new Error(
          `the secondary disk is inconsistent (generation ${m.current}: a resync into it or a failover commit did not finish): failing over to it is refused; ` +
            'bring the primary back (its disk is the consistent one), or declare a disk current with --force-current',
        );
      }
      const t0 = Date.now();
      // nothing stops an old primary on another host that no longer answers, without a lease:
      // it may go on acknowledging writes, and the survivor's record says so (split-brain.ts)
      const old = this.primary;
      const unfenced = !this.lease && old !== null && !old.alive && !old.child && old.pid === undefined;
      const peerGeneration = old ? this.disks[old.name]?.meta?.current : undefined;
      await runFailover(this, reason, {
        commitProgress: (done, total) => this.opts.onProgress?.(done, total, null, 'failover commit'),
        serve: async (side, node) => {
          // never two writers: the old primary acknowledges nothing once its lease is out
          if (this.lease) {
            const waited = await this.lease.waitExpired();
            this.opts.log('info', "the old primary's lease has run out", { waitedMs: Math.round(waited) });
          }
          await this.serve(side, node);
        },
        beforeCommit: async () => {
          // a primary that still answers (manual failover) is demoted: what it holds fails
          const p = this.primary;
          if (p?.alive) await this.call(p, 'x-block-lease-demote', { 'node-name': DISK_NODE }, 1000).catch(() => {});
          if (sd?.meta) await saveDisk(this, sd, { ...sd.meta, consistent: false, updated: new Date().toISOString() });
        },
        afterCommit: async () => {
          if (sd) await goOnAlone(this, sd, 'primary', unfenced ? peerGeneration : undefined);
          if (unfenced) this.opts.log('warn', 'failed over without fencing the old primary (no lease, its host unreachable): if it went on writing, the next start finds a split brain');
        },
      });
      if (!this.stages.tryTo('failed-over')) return;
      this.opts.log('warn', 'failed over: the recovered disk is served by the secondary', { serving: this.serving, ms: Date.now() - t0 });
      this.emit('failed-over', { ms: Date.now() - t0, serving: this.serving });
      this.watchPeerReturn();
    })();
    this.failingOver = run;
    run.catch((e: unknown) => {
      this.lastError = `failover failed: ${errorMessage(e)}`;
      this.opts.log('error', this.lastError);
      this.failingOver = null;
    });
    return run;
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
      ...(this.peerWatch ? { waitingForPeer: this.peerWatch.status() } : {}),
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
    this.peerWatch?.stop();
    this.peerWatch = null;
    if (this.returnTimer) clearTimeout(this.returnTimer);
    this.returnTimer = null;
    this.lease?.stop();
    for (const t of this.timers) clearInterval(t);
    this.timers = [];
    await this.checkpoints.current?.catch(() => {});
    // the daemon's own flush at quit would otherwise wait for a checkpoint that never comes
    // (and the daemon be SIGKILLed 5 s later)
    const p = this.primary;
    if (p?.alive) await this.outputCommit.disable(p).catch(() => {});
    for (const side of [this.primary, this.secondary]) if (side) await stopSide(side, 2000);
    // the daemons are gone: nothing to adopt
    if (this.oneHost && this.recorded) removeDaemons(this.opts.dataDir);
    await this.reprotecting?.catch(() => {});
  }
}
