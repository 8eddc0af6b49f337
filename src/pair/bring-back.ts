// Re-protection as the supervisor runs it: when and how a lost secondary is brought back (after
// a backoff, by `lockstep pair reprotect`, or once a failed side across two hosts answers
// again), the roles swapped after a failover (the survivor becomes the primary), the returning
// disk compared with the serving one by their generations, then reprotect.ts's live resync and
// the step to protected. A refused or failed attempt leaves the pair degraded. The wait for a
// failed side across two hosts is peer-return.ts's.

import { rmSync } from 'node:fs';
import { errorMessage } from '../errors.js';
import { LOG_NODE, OVERLAYS, buildSecondary, ensureImage, type SideLayout } from './setup.js';
import { DISK_FILE, PairDiskError, decideStart, loadDisk, markInStep, markTarget, outdatePeer, refusal, saveDisk, type PairDisk } from './disks.js';
import { newId, type PairSideName, type SyncDecision } from './generations.js';
import { callSide, stopSide, type Side, type SideName } from './sides.js';
import type { ByteRange } from './sync.js';
import { checkUnfenced, enterSplitBrain, otherSide, type SplitBrainHost } from './split-brain.js';
import { Backoff, ReprotectRefused, cleanUpResync, clipExtents, detachReplication, liveResync, type LiveResyncResult, type PassMark, type ResyncProgress } from './reprotect.js';
import { PeerReturnWatch } from './peer-return.js';
import { fenceServed, heldNodes, resetDaemon } from './returning.js';
import { readRecords } from './start.js';
import { PairLease } from './lease.js';
import type { PairOutputCommit } from './output-commit.js';
import { forwardTimeoutS, type PairOptions } from './options.js';
import type { SocketAddress } from '../util/socket-address.js';

/** What the re-protection keeps between attempts (one per supervisor). */
export class ReturnState {
  readonly backoff: Backoff;
  /** the next attempt to bring a lost secondary back */
  returnTimer: NodeJS.Timeout | null = null;
  /** the attempt running */
  reprotecting: Promise<void> | null = null;
  /** a live resync whose target died: where it stood (the primary's daemon still tracks the
   *  writes since that pass began), for the next attempt onto the same disk to resume */
  interrupted: { session: string; mark: PassMark } | null = null;
  /** after a failover across two hosts: waiting for the failed side's daemon to answer */
  peerWatch: PeerReturnWatch | null = null;
  /** a split brain found while the survivor served, resolved keeping the survivor's disk: the
   *  generations it was found at (the re-protection then copies from that disk) */
  resolvedKeep: { keep: PairSideName; at: { primary: string; secondary: string } } | null = null;

  constructor(firstDelayMs: number) {
    this.backoff = new Backoff(firstDelayMs);
  }

  /** Stops the waiting (a stopping supervisor). */
  stop(): void {
    this.peerWatch?.stop();
    this.peerWatch = null;
    if (this.returnTimer) clearTimeout(this.returnTimer);
    this.returnTimer = null;
  }
}

/** What the re-protection reads and sets on the supervisor. */
export interface BringBackHost extends SplitBrainHost {
  readonly opts: PairOptions;
  readonly disks: Record<PairSideName, PairDisk | null>;
  readonly outputCommit: PairOutputCommit;
  readonly returns: ReturnState;
  lease: PairLease | null;
  /** a failover running or done (set: no second one) */
  failingOver: Promise<void> | null;
  resyncProgress: ResyncProgress | null;
  lastReprotect: LiveResyncResult | null;
  changedBytes: number | undefined;
  readonly controlTimeoutMs: number;
  forwardAddress(name?: SideName): SocketAddress;
  layout(dir: string | undefined, attached: boolean): SideLayout;
  /** starts (or attaches to) a side's daemon and watches it */
  launch(name: SideName, attach: SocketAddress | undefined, layout: SideLayout): Promise<Side>;
  sideNamed(name: SideName): Side | null;
  checkpoint(): Promise<unknown>;
}

/** Brings a lost secondary back after the next backoff delay (logged), unless turned off. */
export function scheduleReturn(sup: BringBackHost): void {
  const st = sup.returns;
  if (sup.opts.reprotect === false || st.returnTimer || sup.stages.stage !== 'degraded') return;
  const delay = st.backoff.next();
  const sn = sup.primary ? otherSide(sup.primary.name) : 'secondary';
  const how = (sn === 'secondary' ? sup.opts.secondaryQmp : sup.opts.primaryQmp) ? `reaching the ${sn} daemon again` : `restarting the ${sn} daemon`;
  sup.opts.log('info', `${how} in ${delay} ms (attempt ${st.backoff.attempts})`);
  st.returnTimer = setTimeout(() => {
    st.returnTimer = null;
    void runReprotect(sup).catch(() => {});
  }, delay);
}

/**
 * Re-protects a degraded pair now: brings the secondary back (restarts its daemon here, or
 * reaches it again on its host), resyncs it live from the two change records while the
 * primary serves, and resumes replication (reprotect.ts). Resolves once protected.
 */
export function runReprotect(sup: BringBackHost): Promise<void> {
  const st = sup.returns;
  if (st.reprotecting) return st.reprotecting;
  if (sup.stages.stage === 'failed-over') {
    // run now (by hand, or the watch saw the peer answer): no more waiting
    st.peerWatch?.stop();
    st.peerWatch = null;
    try {
      swapRoles(sup);
    } catch (e) {
      return Promise.reject(e);
    }
  }
  if (sup.stages.stage === 'protected') return Promise.resolve();
  if (sup.stages.stage !== 'degraded') return Promise.reject(new Error(`no re-protection in stage ${sup.stages.stage}`));
  if (st.returnTimer) clearTimeout(st.returnTimer);
  st.returnTimer = null;
  const run = bringBackSecondary(sup).finally(() => {
    st.reprotecting = null;
  });
  st.reprotecting = run;
  run.catch((e: unknown) => {
    // with the primary gone the secondary's disk stays what the resync left: inconsistent
    if (sup.primary?.alive) sup.resyncProgress = null;
    if (sup.stages.stage === 'stopped') return;
    // a split brain found on the way: both daemons stay as they are for `resolve`
    if (sup.stages.stage === 'split-brain') return;
    // the generations refused (split brain, unrelated, the secondary newer): never retried
    const final = e instanceof PairDiskError || e instanceof ReprotectRefused;
    const msg = `re-protection failed: ${errorMessage(e)}`;
    if (final) sup.lastError = msg;
    sup.opts.log(final ? 'error' : 'warn', msg);
    const p = sup.primary;
    // the primary died meanwhile: primary-lost already says why nothing serves
    if (!p?.alive) return;
    // a refused attempt is not retried: nothing to resume
    if (final) st.interrupted = null;
    void (async () => {
      await cleanUpResync(sup, p, st.interrupted !== null);
      const s = sup.secondary;
      // a secondary that still runs is half set up: start it afresh next time
      if (s?.alive && s.child) {
        s.alive = false;
        await stopSide(s, 1000);
      }
      if (sup.stages.tryTo('degraded') && !final) scheduleReturn(sup);
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
function swapRoles(sup: BringBackHost): void {
  const survivor = sup.secondary;
  if (!survivor?.alive) throw new Error('no re-protection: the survivor of the failover is not running');
  const old = sup.primary;
  sup.primary = survivor;
  sup.secondary = old;
  // the old primary's lease was left to run out by the failover: the new primary gets its
  // own inside the barrier that starts replication
  sup.lease?.stop();
  sup.lease = null;
  // the failover is over (its promise stays set to refuse a second one meanwhile)
  sup.failingOver = null;
  sup.returns.backoff.reset();
  sup.stages.to('degraded');
  sup.lastError = undefined;
  sup.opts.log('info', `re-protecting after the failover: the ${survivor.name} daemon, which serves, becomes the primary; the ${otherSide(survivor.name)} disk returns as its secondary`);
}

/** The operator resolved the split brain found while the survivor served, keeping its disk:
 *  while both disks are still at the generations it was found at, copy from the kept one. */
function resolvedDecision(sup: BringBackHost): SyncDecision | null {
  const rk = sup.returns.resolvedKeep;
  if (!rk || sup.disks.primary?.meta?.current !== rk.at.primary || sup.disks.secondary?.meta?.current !== rk.at.secondary) return null;
  return { kind: 'incremental', source: rk.keep, reason: `split brain resolved: the ${rk.keep} disk kept` };
}

/** One attempt: the secondary relaunched, its disk compared, resynced live, protected. */
async function bringBackSecondary(sup: BringBackHost): Promise<void> {
  const p = sup.primary;
  if (!p?.alive) throw new Error('the primary is not running');
  // the secondary's daemon is the one not playing the primary (swapped after a failover)
  const sn = otherSide(p.name);
  const pd = sup.disks[p.name];
  if (!pd) throw new Error('the primary is not running');
  const { s, forward } = await relaunchSecondary(sup, pd, sn);
  const { sd, decision, built } = await compareReturning(sup, p, s, forward);
  const point = resumePoint(sup, sn, sd, decision);
  if (!built) await buildReturning(sup, s, forward);
  const r = await resyncLive(sup, p, s, pd, sd, forward, decision, point);
  await finishReprotect(sup, pd, sd, r);
}

/** Stops what is left of the old secondary, starts (or reaches) its daemon again, and marks
 *  it outdated first if that was not possible when it was lost. */
async function relaunchSecondary(sup: BringBackHost, pd: PairDisk, sn: SideName): Promise<{ s: Side; forward: SocketAddress }> {
  const o = sup.opts;
  const old = sup.secondary;
  if (old) {
    // a daemon here that still runs (taken out after its forward failed) is asked to quit
    // first; a dead or hung one is killed after stopSide's wait
    const running = old.alive && !old.qmp.closed;
    old.alive = false;
    if (old.child) {
      if (running) await callSide(old, 'quit', undefined, 1000).catch(() => {});
      await stopSide(old, 1000);
    } else old.qmp.close();
  }
  const forward = sup.forwardAddress(sn);
  const attach = sn === 'secondary' ? o.secondaryQmp : o.primaryQmp;
  const sl = sup.layout(sn === 'secondary' ? o.secondaryDir : o.primaryDir, attach !== undefined);
  if (forward.type === 'unix') rmSync(forward.path, { force: true });
  const s = await sup.launch(sn, attach, sl);
  sup.secondary = s;
  // first of all, the returning secondary is marked outdated if that was not possible before
  if (pd.meta?.peerNotOutdated !== undefined && !(await outdatePeer(sup, pd, s, DISK_FILE[sn], sup.controlTimeoutMs))) {
    throw new Error('the secondary could not be marked outdated');
  }
  return { s, forward };
}

/** The returning disk's overlays and secondary graph. */
async function buildReturning(sup: BringBackHost, s: Side, forward: SocketAddress): Promise<void> {
  const sn = s.name;
  for (const n of [OVERLAYS[sn].active, OVERLAYS[sn].hidden]) await ensureImage(s.qmp, s.layout, n, sup.opts.size, false);
  await buildSecondary(s.qmp, s.layout, forward, sup.opts.tls?.serverCreds, sn);
}

/**
 * Compares the returning disk with the serving one by their generations (and change records):
 * the decision to copy from the primary's disk, or a refusal, or stage split-brain (thrown).
 * `built`: the returning disk was built as the secondary to read its record.
 */
async function compareReturning(sup: BringBackHost, p: Side, s: Side, forward: SocketAddress): Promise<{ sd: PairDisk; decision: SyncDecision; built: boolean }> {
  const o = sup.opts;
  const sn = s.name;
  // a daemon on another host that ran on through a cut link still holds its graph: its
  // records are read where they are open, and the graph is taken down only once the
  // generations say its disk is the older one (returning.ts)
  const held = s.child ? [] : await heldNodes(sup, s);
  let created = false;
  if (held.length === 0) created = (await ensureImage(s.qmp, s.layout, DISK_FILE[sn], o.size, true)) === 'created';
  const sd = (sup.disks[sn] = await loadDisk(sup, s, sn, created, o.size));
  // the generations are compared by disk (started as primary, as secondary), unless the
  // operator resolved this very split brain keeping the serving disk
  const resolved = resolvedDecision(sup);
  const first = resolved ?? decideStart(sup.disks.primary!, sup.disks.secondary!, undefined);
  // a split brain is counted from the records below; anything else refused is refused here
  const refused = first.kind === 'split-brain' ? null : refusal(first);
  if (refused) throw refused;
  if ((first.kind === 'incremental' || first.kind === 'full') && first.source !== p.name) throw new ReprotectRefused(`the generations say the ${sn} disk is newer (${first.reason}): not copying over it while the ${p.name} daemon serves`);
  let built = false;
  if (!resolved && (first.kind === 'incremental' || first.kind === 'split-brain')) {
    // the returning disk's record is in its dirty log: opened by building the disk as the
    // secondary (a fresh daemon), or open already (a daemon that ran on)
    if (held.length === 0) {
      await buildReturning(sup, s, forward);
      built = true;
    } else if (!held.includes(LOG_NODE[sn])) {
      throw new Error(`the ${sn} daemon holds block nodes (${held.slice(0, 5).join(', ')}) but not its disk's dirty log ${LOG_NODE[sn]}: restart it (lockstep pair host)`);
    }
    const records = await readRecords(sup.sideNamed('primary')!, sup.sideNamed('secondary')!);
    // a survivor of an unfenced failover whose old primary went on writing: split brain too
    const decision = first.kind === 'incremental' ? checkUnfenced(first, sup.disks.primary!.meta, sup.disks.secondary!.meta, records) : first;
    if (decision.kind === 'split-brain') {
      // nothing is copied, and the returning disk adds nothing more to its history
      if (held.length > 0 && (await fenceServed(sup, s))) o.log('warn', `the ${sn} daemon still served its disk: fenced, it acknowledges no write until the split brain is resolved`);
      enterSplitBrain(sup, decision.reason, records, p.name);
      throw new PairDiskError('ESPLITBRAIN', sup.lastError!);
    }
  }
  if (held.length > 0) {
    o.log('warn', `the ${sn} daemon ran on with its old graph (${held.slice(0, 5).join(', ')}); its disk is the older one (${first.reason}): taking the graph down to build the disk as the secondary`);
    await resetDaemon(sup, s);
  }
  return { sd, decision: first, built };
}

/** Where this attempt's live resync starts: the rest of an interrupted one, or the records. */
interface ResumePoint {
  resume: ByteRange[] | undefined;
  session: string;
  passBase: number;
}

function resumePoint(sup: BringBackHost, sn: SideName, sd: PairDisk, first: SyncDecision): ResumePoint {
  const st = sup.returns;
  // an interrupted resync onto this same disk (its record carries that attempt's session)
  // resumes: the rest of its pass above the persisted mark, and what was written since
  const was = st.interrupted;
  const rec = sd.meta?.resync;
  let resume: ByteRange[] | undefined;
  if (was && rec?.session === was.session && first.kind !== 'none') {
    // the persisted mark counts when it is of the pass that was running; otherwise that
    // pass is copied whole (it had not persisted anything: the barrier's remainder)
    const doneUpTo = rec.pass === was.mark.pass ? rec['done-up-to'] : (was.mark.extents[0]?.offset ?? 0);
    resume = clipExtents(was.mark.extents, doneUpTo);
  } else if (was) {
    sup.opts.log('info', `the interrupted resync is not resumed (the ${sn} disk is not the one it copied to): copying from the records`);
  }
  const session = was && resume ? was.session : newId();
  // pass numbers go on across the attempts of one session, so that a persisted mark is
  // never taken for a later attempt's pass of the same number
  const passBase = was && resume ? was.mark.pass + 1 : 0;
  // nothing to resume: the records name everything (a superset)
  if (!resume) st.interrupted = null;
  return { resume, session, passBase };
}

/** Stage resyncing: the returning disk marked inconsistent, copied live from the primary's
 *  (reprotect.ts), its marks kept for a later attempt; replication starts inside the barrier. */
async function resyncLive(sup: BringBackHost, p: Side, s: Side, pd: PairDisk, sd: PairDisk, forward: SocketAddress, decision: SyncDecision, point: ResumePoint): Promise<LiveResyncResult> {
  const o = sup.opts;
  const st = sup.returns;
  const { resume, session, passBase } = point;
  o.log('info', `the ${s.name} daemon is back as the secondary: ${decision.kind === 'none' ? 'nothing to copy' : `${decision.kind} resync from the ${p.name} disk`}, while the ${p.name} daemon serves`, { reason: decision.reason });
  sup.stages.to('resyncing');
  sup.resyncProgress = { done: 0, total: 0, 'eta-seconds': null, pass: 0 };
  await markTarget(sup, sd);
  await detachReplication(sup, p);
  const ioTimeoutS = forwardTimeoutS(o);
  return (sup.lastReprotect = await liveResync(sup, p, s, {
    forward,
    clientCreds: o.tls?.clientCreds,
    ioTimeoutS,
    full: decision.kind === 'full',
    size: o.size,
    speed: o.resyncRate,
    onProgress: o.onProgress,
    progress: sup.resyncProgress,
    resume,
    pieceBytes: o.resyncPieceBytes,
    onDone: async (m, durable) => {
      const mark = { ...m, pass: passBase + m.pass };
      // a new pass's extents are kept in memory at once, none of it counted done: they hold
      // the writes drained from the tracking, which must not be lost if the persist fails
      const known = st.interrupted;
      if (!known || known.mark.pass !== mark.pass || known.mark.extents !== m.extents || known.session !== session) {
        st.interrupted = { session, mark: { ...mark, doneUpTo: mark.extents[0]?.offset ?? 0 } };
      }
      // then persisted first: the mark in memory never runs ahead of the one on the target's host
      if (durable && sd.meta) {
        const source = pd.meta?.current ?? '';
        await saveDisk(sup, sd, { ...sd.meta, resync: { session, source, pass: mark.pass, 'done-up-to': mark.doneUpTo }, updated: new Date().toISOString() });
      }
      st.interrupted = { session, mark };
    },
    // flushes acknowledged from here on must wait for a checkpoint again
    insideBarrier: async () => {
      // a survivor that becomes the primary: its own lease from here (a lost secondary's
      // primary kept its lease all along)
      const leaseMs = o.leaseMs ?? o.heartbeatTimeoutMs;
      if (!sup.lease && leaseMs > 0) {
        sup.lease = new PairLease(sup, leaseMs, o.heartbeatIntervalMs);
        await sup.lease.start(p);
      }
      if (o.flushCommit !== false) await sup.outputCommit.enable(p);
    },
  }));
}

/** The resync ended inside its barrier: both disks recorded in step, stage protected. */
async function finishReprotect(sup: BringBackHost, pd: PairDisk, sd: PairDisk, r: LiveResyncResult): Promise<void> {
  const st = sup.returns;
  if (sup.stages.stage !== 'resyncing') throw new Error(`the pair left the resync (now ${sup.stages.stage})`);
  st.interrupted = null;
  st.resolvedKeep = null;
  await markInStep(sup, pd, sd, 'primary');
  sup.resyncProgress = null;
  sup.changedBytes = undefined;
  sup.lastError = undefined;
  st.backoff.reset();
  sup.stages.to('protected');
  sup.opts.log('info', 'protected again: the secondary is resynced and replication runs', {
    passes: r.passes.length,
    bytes: r.passes.reduce((a, x) => a + x.bytes, 0),
    barrierBytes: r.barrierBytes,
    pauseMs: r.pauseMs,
  });
  // a flush that waited during the step to protected gets its checkpoint now
  if (sup.outputCommit.enabled) void sup.checkpoint().catch(() => {});
  sup.emit('protected', r);
}
