// A start on two fresh daemons (started as primary, as secondary): the images, the generations
// compared before anything is copied, the graphs, then the copy the comparison asks for and
// replication (protect), or stage split-brain (split-brain.ts). A resolve sets the pair up
// again through the same steps (resolve.ts).

import { rmSync } from 'node:fs';
import { DISK_NODE, LOG_NODE, PRIMARY_LOG, addPrimaryDisk, addPrimaryQuorum, buildSecondary, ensureImage, forwardNode } from './setup.js';
import { decideStart, loadDisk, markInStep, markTarget, refusal, type PairDisk } from './disks.js';
import type { PairSideName, SyncDecision } from './generations.js';
import type { Side, SideName } from './sides.js';
import { resync, unionExtents, type ByteRange, type ResyncResult } from './sync.js';
import { checkUnfenced, enterSplitBrain, type SideRecords, type SplitBrainHost } from './split-brain.js';
import { startReplication } from './reprotect.js';
import { PairLease } from './lease.js';
import type { PairOutputCommit } from './output-commit.js';
import { forwardTimeoutS, type PairOptions } from './options.js';
import type { SocketAddress } from '../util/socket-address.js';

/** What a start decided about copying (status `sync`). */
export interface SyncRecord {
  kind: string;
  reason: string;
  source?: PairSideName;
}

/** A start's copy (or a resolve's) running: which side it writes, its progress. */
export interface StartCopy {
  target: PairSideName;
  done: number;
  total: number;
  'eta-seconds': number | null;
}

/** What a start reads and sets on the supervisor. */
export interface StartHost extends SplitBrainHost {
  readonly opts: PairOptions;
  readonly disks: Record<PairSideName, PairDisk | null>;
  readonly outputCommit: PairOutputCommit;
  lastSync: SyncRecord | null;
  lastResync: ResyncResult | null;
  startCopy: StartCopy | null;
  lease: PairLease | null;
  readonly serving: string[];
  forwardAddress(name?: SideName): SocketAddress;
  /** serves `node` of `side` on the user's addresses */
  serve(side: Side, node: string): Promise<void>;
  /** the heartbeat and checkpoint timers */
  startTimers(): void;
}

/** On two fresh daemons (started as primary, as secondary): the images, the generations
 *  compared, the graphs, then the copy and replication, or stage split-brain. */
export async function setUp(sup: StartHost, p: Side, s: Side): Promise<void> {
  const o = sup.opts;
  const forward = sup.forwardAddress();
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
  const pd = (sup.disks.primary = await loadDisk(sup, p, 'primary', created['primary.qcow2']!, o.size));
  const sd = (sup.disks.secondary = await loadDisk(sup, s, 'secondary', created['secondary.qcow2']!, o.size));
  const first = decideStart(pd, sd, o.forceCurrent);
  // a split brain is not refused outright: the disks are opened (nothing is served or
  // copied) so that what each side changed can be reported and a resolve can copy
  const refused = first.kind === 'split-brain' ? null : refusal(first);
  if (refused) {
    sup.lastSync = { kind: first.kind, reason: first.reason };
    throw refused;
  }
  if (forward.type === 'unix') rmSync(forward.path, { force: true });
  await buildSecondary(s.qmp, s.layout, forward, tls?.serverCreds);
  await addPrimaryDisk(p.qmp, p.layout);
  const records = first.kind === 'incremental' || first.kind === 'split-brain' ? await readRecords(p, s) : null;
  // a survivor of an unfenced failover whose old primary changed anything: split brain too
  const decision = records ? checkUnfenced(first, pd.meta, sd.meta, records) : first;
  sup.lastSync = { kind: decision.kind, reason: decision.reason, ...('source' in decision ? { source: decision.source } : {}) };
  if (decision.kind === 'split-brain') {
    enterSplitBrain(sup, decision.reason, records!);
    return;
  }
  o.log('info', `disks compared: ${decision.kind === 'none' ? 'nothing to copy' : `${decision.kind} sync from the ${'source' in decision ? decision.source : ''} disk`}`, { reason: decision.reason });
  await protect(sup, decision, records);
}

/** Each side's change record (its dirty log as the daemon holds it now). */
export async function readRecords(p: Side, s: Side): Promise<SideRecords> {
  const [pr, sr] = await Promise.all(
    ([[p, 'primary'], [s, 'secondary']] as const).map(async ([side, n]) => (await side.qmp.execute('x-dirty-log-query', { 'node-name': LOG_NODE[n] })) as { extents: ByteRange[]; 'dirty-bytes': number }),
  );
  return { primary: { extents: pr!.extents, bytes: pr!['dirty-bytes'] }, secondary: { extents: sr!.extents, bytes: sr!['dirty-bytes'] } };
}

/** From the compared disks to a protected pair: the copy the decision asks for, then replication. */
export async function protect(sup: StartHost, decision: SyncDecision, records: SideRecords | null): Promise<void> {
  const o = sup.opts;
  const p = sup.primary!;
  const s = sup.secondary!;
  const pd = sup.disks.primary!;
  const sd = sup.disks.secondary!;
  const forward = sup.forwardAddress();
  const tls = o.tls;
  sup.stages.to('syncing');
  if (decision.kind === 'incremental' || decision.kind === 'full') {
    const toSecondary = decision.source === 'primary';
    // an incremental resync copies the union of both records: what the newer side changed
    // since the common generation, and what the older side changed that the newer never
    // had (its writes after the last checkpoint, which a failover discarded)
    let extents: ByteRange[] = [{ offset: 0, length: o.size }];
    if (decision.kind === 'incremental') extents = unionExtents(records!.primary.extents, records!.secondary.extents);
    await markTarget(sup, toSecondary ? sd : pd);
    await p.qmp.execute('blockdev-add', { 'node-name': 'sync-peer', ...forwardNode(forward, tls?.clientCreds, 0) });
    const targetIsZero = decision.kind === 'full' && decision.targetIsZero;
    const what = decision.kind === 'full' ? 'initial sync' : 'resync';
    const [from, to] = toSecondary ? [PRIMARY_LOG, 'sync-peer'] : ['sync-peer', PRIMARY_LOG];
    const copy = (sup.startCopy = { target: toSecondary ? ('secondary' as const) : ('primary' as const), done: 0, total: extents.reduce((a, r) => a + r.length, 0), 'eta-seconds': null as number | null });
    const progress: typeof o.onProgress = (done, total, eta, w) => {
      Object.assign(copy, { done, total, 'eta-seconds': eta });
      o.onProgress?.(done, total, eta, w);
    };
    try {
      sup.lastResync = await resync(p.qmp, o.log, progress, from, to, extents, targetIsZero, what);
    } finally {
      sup.startCopy = null;
    }
    await p.qmp.execute('blockdev-del', { 'node-name': 'sync-peer' });
  }
  await markInStep(sup, pd, sd, 'source' in decision ? decision.source : 'primary');
  // the disks are equal (or were already): neither has changed since the new common point
  if (decision.kind !== 'none') for (const [side, n] of [[p, 'primary'], [s, 'secondary']] as const) await side.qmp.execute('x-dirty-log-clear', { 'node-name': LOG_NODE[n] });
  await addPrimaryQuorum(p.qmp);
  const ioTimeoutS = forwardTimeoutS(o);
  await startReplication(p.qmp, s.qmp, { forward, clientCreds: tls?.clientCreds, ioTimeoutS });
  const leaseMs = o.leaseMs ?? o.heartbeatTimeoutMs;
  if (leaseMs > 0) {
    sup.lease = new PairLease(sup, leaseMs, o.heartbeatIntervalMs);
    await sup.lease.start(p);
  }
  if (o.flushCommit !== false) await sup.outputCommit.enable(p);
  await sup.serve(p, DISK_NODE);
  sup.stages.to('protected');
  o.log('info', 'replication is running', { serving: sup.serving, forward: forward.type === 'unix' ? forward.path : `${forward.host}:${forward.port}`, tls: !!tls });
  sup.startTimers();
}
