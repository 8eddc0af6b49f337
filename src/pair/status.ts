// `lockstep pair status`: what the supervisor reports, built from its state and metrics.

import { sideRoles, type PairMetrics } from './metrics.js';
import type { DiskMeta } from './generations.js';
import { STAGE_POLICY, type PairStage } from './stages.js';
import type { PeerWaitStatus } from './peer-return.js';
import type { LiveResyncResult } from './reprotect.js';

export interface PairStatus {
  stage: PairStage;
  role: string;
  /** present when roles are swapped: the daemon started as secondary (its disk
   *  secondary.qcow2) plays the primary since a failover's re-protection */
  'primary-side'?: 'primary' | 'secondary';
  checkpoints: number;
  'checkpoint-failures': number;
  'last-pause-ms': number | null;
  'pause-median-ms': number | null;
  'pause-p99-ms': number | null;
  /** bytes the secondary copied into its hidden disk since replication started */
  'hidden-copied-bytes': number;
  /** clusters copied into the hidden disk since the last checkpoint (query-replication's name) */
  'dirty-clusters': number;
  'heartbeat-age-ms': number | null;
  serving: string[];
  /** degraded: bytes the primary changed since the last checkpoint the secondary confirmed */
  'changed-bytes'?: number;
  /** degraded: the file listing those regions (for a later re-protection) */
  'changed-regions-file'?: string;
  'last-error'?: string;
  /** heartbeats answered (or still unanswered) past the timeout, and the longest wait */
  heartbeats?: Record<string, { late: number; 'max-late-ms': number }>;
  /** what the last start decided about copying (generations compared) */
  sync?: { kind: string; reason: string; source?: string };
  /** a live resync onto the secondary (re-protection): bytes copied, to copy, seconds left,
   *  the pass, and why the secondary may not serve meanwhile */
  resync?: { done: number; total: number; 'eta-seconds': number | null; pass: number; reason: string; 'bytes-per-second'?: number };
  /** each disk's generation record as the supervisor last wrote or read it */
  disks?: Record<string, { generation: string; bitmap: string | null; consistent: boolean; role: string } | null>;
  /** per side: its generation, consistency, role in the pair now, the bytes it changed that
   *  the peer lacks (null: unknown), and the resync into it, if one runs */
  sides?: Record<'primary' | 'secondary', SideStatus>;
  /** stage split-brain: what each side changed, what a resolve copies, what to run */
  'split-brain'?: { reason: string; 'changed-bytes': { primary: number; secondary: number }; 'diverged-bytes': number; commands: string[] };
  /** after a failover across two hosts: the failed side's daemon awaited, to re-protect by
   *  itself once it answers (peer-return.ts) */
  'waiting-for-peer'?: PeerWaitStatus;
  /** what the last live resync (re-protection) copied: pass 0 is the union of both change
   *  records (its ranges listed up to UNION_SHOWN of them), the later passes what was
   *  written meanwhile, and the job's counters per pass */
  'last-reprotect'?: ReprotectSummary;
}

export const UNION_SHOWN = 256;

export interface ReprotectSummary {
  'union-bytes': number;
  'union-extents': number;
  /** the union's ranges, when there are at most UNION_SHOWN */
  union?: Array<{ offset: number; length: number }>;
  passes: Array<{ bytes: number; 'data-bytes': number; 'zeroed-bytes': number; 'skipped-zero-bytes': number }>;
  'barrier-bytes': number;
  'pause-ms': number;
}

export function reprotectSummary(r: LiveResyncResult): ReprotectSummary {
  return {
    'union-bytes': r.union.reduce((a, x) => a + x.length, 0),
    'union-extents': r.union.length,
    ...(r.union.length <= UNION_SHOWN ? { union: r.union } : {}),
    passes: r.passes.map((p) => ({ bytes: p.bytes, 'data-bytes': p.dataBytes, 'zeroed-bytes': p.zeroedBytes, 'skipped-zero-bytes': p.skippedZeroBytes })),
    'barrier-bytes': r.barrierBytes,
    'pause-ms': r.pauseMs,
  };
}

export interface SideStatus {
  generation: string | null;
  consistent: boolean | null;
  /** as drbd_resource_role: Primary serves, Secondary is the replica (or waits), Unknown is lost */
  role: 'Primary' | 'Secondary' | 'Unknown';
  'changed-bytes': number | null;
  resync: { done: number; total: number; 'bytes-per-second': number; 'eta-seconds': number | null } | null;
}

export interface SideInputs {
  stage: PairStage;
  meta: { primary: DiskMeta | null | undefined; secondary: DiskMeta | null | undefined };
  /** split brain: each record's bytes */
  splitChanged?: { primary: number; secondary: number };
  /** degraded: the primary's changes since the last confirmed checkpoint */
  degradedChanged?: number;
  /** a resync running: a live one into the secondary, or a start's copy */
  resync?: { done: number; total: number; 'bytes-per-second': number; 'eta-seconds': number | null };
  /** the side the resync writes (default the secondary) */
  resyncTarget?: 'primary' | 'secondary';
  /** the side whose daemon plays the primary (default the primary) */
  primarySide?: 'primary' | 'secondary';
  /** the disk is served (a split brain found while the survivor served) */
  serving?: boolean;
}

/** Each side's line of the status, from the stage, the records and the copy running. */
export function buildSides(i: SideInputs): Record<'primary' | 'secondary', SideStatus> {
  const roles = sideRoles(i.stage, i.primarySide);
  const primaryRole = i.primarySide ?? 'primary';
  // a split brain found while the survivor served: it serves on, the other stands alone
  if (i.stage === 'split-brain' && i.serving) roles[primaryRole] = 'Primary';
  const changed = (side: 'primary' | 'secondary'): number | null => {
    if (i.splitChanged) return i.splitChanged[side];
    // protected: every write reaches the peer, which lacks nothing
    if (i.stage === 'protected') return 0;
    if (i.stage === 'degraded' && side === primaryRole) return i.degradedChanged ?? null;
    // a copy running: the source's changes the target still lacks
    if (i.resync && side !== (i.resyncTarget ?? 'secondary')) return Math.max(0, i.resync.total - i.resync.done);
    return null;
  };
  const one = (side: 'primary' | 'secondary'): SideStatus => {
    const m = i.meta[side];
    return {
      generation: m?.current ?? null,
      consistent: m ? m.consistent : null,
      role: roles[side],
      'changed-bytes': changed(side),
      resync: side === (i.resyncTarget ?? 'secondary') && i.resync ? i.resync : null,
    };
  };
  return { primary: one('primary'), secondary: one('secondary') };
}

export interface StatusInputs {
  stage: PairStage;
  metrics: PairMetrics;
  lastPauseMs: number | null;
  primaryLastAnswer: number | null;
  serving: string[];
  changedBytes: number | undefined;
  changedRegionsFile: string;
  lastError: string | undefined;
  sync?: PairStatus['sync'] | null;
  heartbeats?: PairStatus['heartbeats'];
  disks?: PairStatus['disks'];
  resync?: PairStatus['resync'];
  sides?: PairStatus['sides'];
  splitBrain?: PairStatus['split-brain'];
  primarySide?: 'primary' | 'secondary';
  waitingForPeer?: PeerWaitStatus;
  lastReprotect?: LiveResyncResult | null;
}

export function buildStatus(i: StatusInputs): PairStatus {
  const q = (x: number | null) => (x === null ? null : x * 1000);
  const st: PairStatus = {
    stage: i.stage,
    // a split brain found while the survivor served: it serves on
    role: i.stage === 'split-brain' && i.serving.length > 0 ? `${i.primarySide ?? 'primary'} serving` : STAGE_POLICY[i.stage].role,
    checkpoints: i.metrics.checkpoints,
    'checkpoint-failures': i.metrics.checkpointFailures,
    'last-pause-ms': i.lastPauseMs,
    'pause-median-ms': q(i.metrics.pause.quantile(0.5)),
    'pause-p99-ms': q(i.metrics.pause.quantile(0.99)),
    'hidden-copied-bytes': i.metrics.hiddenCopiedBytes,
    'dirty-clusters': i.metrics.hiddenCopiedClusters,
    'heartbeat-age-ms': i.primaryLastAnswer === null ? null : Date.now() - i.primaryLastAnswer,
    serving: i.serving,
  };
  if (i.primarySide === 'secondary') st['primary-side'] = 'secondary';
  if (i.changedBytes !== undefined) {
    st['changed-bytes'] = i.changedBytes;
    st['changed-regions-file'] = i.changedRegionsFile;
  }
  if (i.lastError) st['last-error'] = i.lastError;
  if (i.heartbeats) st.heartbeats = i.heartbeats;
  if (i.sync) st.sync = i.sync;
  if (i.disks) st.disks = i.disks;
  if (i.resync) st.resync = i.resync;
  if (i.sides) st.sides = i.sides;
  if (i.splitBrain) st['split-brain'] = i.splitBrain;
  if (i.waitingForPeer) st['waiting-for-peer'] = i.waitingForPeer;
  if (i.lastReprotect) st['last-reprotect'] = reprotectSummary(i.lastReprotect);
  return st;
}
