// `lockstep pair status`: what the supervisor reports, built from its state and metrics.

import type { PairMetrics } from './metrics.js';
import { STAGE_POLICY, type PairStage } from './stages.js';

export interface PairStatus {
  stage: PairStage;
  role: string;
  checkpoints: number;
  'checkpoint-failures': number;
  'last-pause-ms': number | null;
  'pause-median-ms': number | null;
  'pause-p99-ms': number | null;
  /** bytes the secondary copied into its hidden disk since replication started */
  'hidden-copied-bytes': number;
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
  resync?: { done: number; total: number; 'eta-seconds': number | null; pass: number; reason: string };
  /** each disk's generation record as the supervisor last wrote or read it */
  disks?: Record<string, { generation: string; bitmap: string | null; consistent: boolean; role: string } | null>;
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
}

export function buildStatus(i: StatusInputs): PairStatus {
  const q = (x: number | null) => (x === null ? null : x * 1000);
  const st: PairStatus = {
    stage: i.stage,
    role: STAGE_POLICY[i.stage].role,
    checkpoints: i.metrics.checkpoints,
    'checkpoint-failures': i.metrics.checkpointFailures,
    'last-pause-ms': i.lastPauseMs,
    'pause-median-ms': q(i.metrics.pause.quantile(0.5)),
    'pause-p99-ms': q(i.metrics.pause.quantile(0.99)),
    'hidden-copied-bytes': i.metrics.hiddenCopiedBytes,
    'dirty-clusters': i.metrics.dirtyClusters,
    'heartbeat-age-ms': i.primaryLastAnswer === null ? null : Date.now() - i.primaryLastAnswer,
    serving: i.serving,
  };
  if (i.changedBytes !== undefined) {
    st['changed-bytes'] = i.changedBytes;
    st['changed-regions-file'] = i.changedRegionsFile;
  }
  if (i.lastError) st['last-error'] = i.lastError;
  if (i.heartbeats) st.heartbeats = i.heartbeats;
  if (i.sync) st.sync = i.sync;
  if (i.disks) st.disks = i.disks;
  if (i.resync) st.resync = i.resync;
  return st;
}
