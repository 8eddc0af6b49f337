// The pair's stages and the one table of what may follow what, with what each stage allows
// (policy as data, as src/block/filters/replication/state.ts and src/jobs/job-status.ts do):
// the supervisor moves between stages only through `StageMachine.to`, which refuses a
// transition the table does not list.
//
//   starting -> syncing -> protected -> failed-over | degraded | primary-lost -> stopped
//   primary-lost -> failed-over (manual failover)
//   degraded -> resyncing -> protected (a lost secondary back: live resync, re-protect.ts)
//   failed-over -> degraded -> resyncing -> protected (the failed side back: the survivor
//   becomes the primary, roles swapped, serving alone until the old primary's disk, resynced
//   live as its secondary, is in step; a failed attempt leaves it degraded and retried)
//   resyncing -> degraded (the secondary lost again) | primary-lost (never failed over: the
//   secondary's disk is inconsistent until the resync ends)
//   starting -> split-brain (both disks changed since they diverged: nothing is served or
//   copied) -> syncing (`lockstep pair resolve --keep SIDE`, split-brain.ts)
//   degraded -> split-brain (the failed side came back while the survivor serves, and both
//   changed since they diverged: nothing copied, the survivor serves on, the returning disk
//   fenced) -> degraded (`resolve --keep` the survivor: its disk is resynced onto the other,
//   as a lost secondary's) or syncing (`resolve --keep` the returning side, set up afresh)

export type PairStage = 'starting' | 'syncing' | 'protected' | 'primary-lost' | 'failed-over' | 'degraded' | 'resyncing' | 'split-brain' | 'stopped';

export const STAGE_TRANSITIONS: Record<PairStage, readonly PairStage[]> = {
  starting: ['syncing', 'split-brain', 'stopped'],
  syncing: ['protected', 'stopped'],
  protected: ['primary-lost', 'failed-over', 'degraded', 'stopped'],
  'primary-lost': ['failed-over', 'stopped'],
  degraded: ['resyncing', 'split-brain', 'stopped'],
  resyncing: ['protected', 'degraded', 'primary-lost', 'stopped'],
  'failed-over': ['degraded', 'stopped'],
  // resolved: the kept side's disk is copied onto the other's (then as a start's sync)
  'split-brain': ['syncing', 'degraded', 'stopped'],
  stopped: [],
};

export interface StagePolicy {
  /** what `status` says serves the disk */
  role: string;
  /** checkpoints are taken (by the timer and on request) */
  checkpoints: boolean;
  /** a failover to the secondary may run (it must hold a checkpoint to fail over to) */
  failover: boolean;
}

export const STAGE_POLICY: Record<PairStage, StagePolicy> = {
  starting: { role: 'primary serving', checkpoints: false, failover: false },
  syncing: { role: 'primary serving', checkpoints: false, failover: false },
  protected: { role: 'primary serving', checkpoints: true, failover: true },
  'primary-lost': { role: 'none serving', checkpoints: false, failover: true },
  degraded: { role: 'primary serving', checkpoints: false, failover: false },
  'failed-over': { role: 'secondary serving', checkpoints: false, failover: false },
  // the primary serves while the returning secondary's disk is copied to; it is inconsistent
  resyncing: { role: 'primary serving', checkpoints: false, failover: false },
  // neither disk is current until the operator says which: serving either would add to one
  // history, copying would destroy the other. Found while a survivor serves, that survivor
  // serves on (status says so: role '<side> serving'); docs/replication.md says why
  'split-brain': { role: 'none serving', checkpoints: false, failover: false },
  stopped: { role: 'primary serving', checkpoints: false, failover: false },
};

export function canTransition(from: PairStage, to: PairStage): boolean {
  return STAGE_TRANSITIONS[from].includes(to);
}

export class StageError extends Error {
  readonly code = 'EPAIRSTAGE';
}

/** The current stage; every change goes through the table. */
export class StageMachine {
  constructor(
    private current: PairStage = 'starting',
    private readonly onChange?: (from: PairStage, to: PairStage) => void,
  ) {}

  get stage(): PairStage {
    return this.current;
  }

  get policy(): StagePolicy {
    return STAGE_POLICY[this.current];
  }

  /** Moves to `to`; a transition the table does not list is a bug in the caller. */
  to(to: PairStage): void {
    if (to === this.current) return;
    if (!canTransition(this.current, to)) throw new StageError(`the pair cannot go from ${this.current} to ${to}`);
    const from = this.current;
    this.current = to;
    this.onChange?.(from, to);
  }

  /** A restarted supervisor takes over running daemons (adopt.ts) in the stage the dead one
   *  recorded: the one jump the table does not list, and only from the start. */
  adopt(stage: PairStage): void {
    if (this.current !== 'starting') throw new StageError(`the pair adopts daemons only when starting, not in ${this.current}`);
    this.current = stage;
    this.onChange?.('starting', stage);
  }

  /** Moves to `to` when the table allows it from here; reports whether it did. */
  tryTo(to: PairStage): boolean {
    if (to !== this.current && !canTransition(this.current, to)) return false;
    this.to(to);
    return true;
  }
}
