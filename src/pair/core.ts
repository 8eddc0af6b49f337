// What the parts of the supervisor (checkpoint barrier, liveness, failover, sync, status) see
// of it: the sides, the stage machine, the options, the metrics and a logger. The parts are
// modules of functions over this view; PairSupervisor owns the state and wires them.

import type { PairMetrics } from './metrics.js';
import type { Side } from './sides.js';
import type { StageMachine } from './stages.js';

export type PairLog = (level: 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>) => void;

export interface PairCore {
  readonly stages: StageMachine;
  readonly metrics: PairMetrics;
  readonly log: PairLog;
  primary: Side | null;
  secondary: Side | null;
  /** the last error, shown in status */
  lastError: string | undefined;
  /** a QMP call to a side that gives up after the control timeout (or `timeoutMs`) */
  call(side: Side, command: string, args?: Record<string, unknown>, timeoutMs?: number): Promise<unknown>;
  emit(event: string, ...args: unknown[]): boolean;
  /** sent inside the barrier once the secondary has checkpointed, before the release
   *  (output commit: output-commit.ts) */
  insideBarrier?(primary: Side): Promise<void>;
}
