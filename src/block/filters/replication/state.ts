// Replication modes and stages, the transition table, and the I/O policy as pure functions
// of them (QEMU 7.2's block/replication.c, as docs/replication.md's "Stages" describes it).

export type ReplicationMode = 'primary' | 'secondary';
export type Stage = 'none' | 'running' | 'failover' | 'failover-failed' | 'done';

/** The numbers QEMU prints in "needs %d, but got %d". */
export const MODE_NUMBER: Record<ReplicationMode, number> = { primary: 0, secondary: 1 };

export const STAGE_TRANSITIONS: Record<Stage, readonly Stage[]> = {
  none: ['running'],
  // a start that fails is rolled back to none (decision 7/8); stops go to done or failover
  running: ['done', 'failover', 'none'],
  failover: ['done', 'failover-failed'],
  'failover-failed': [],
  done: [],
};

export function canTransition(from: Stage, to: Stage): boolean {
  return STAGE_TRANSITIONS[from].includes(to);
}

/** What a read or write does in a mode and stage. */
export type IoPolicy =
  /** fail with EIO, record nothing */
  | 'eio'
  /** pass to the file child, errors returned as they are */
  | 'pass'
  /** pass to the file child; a failure is recorded for get_error and hidden (primary) */
  | 'forward-record'
  /** split by allocation: overlay-owned ranges to the active disk, the rest to the secondary disk */
  | 'route-by-allocation';

export function readPolicy(mode: ReplicationMode, stage: Stage): IoPolicy {
  if (mode === 'primary') return 'eio';
  return stage === 'none' ? 'eio' : 'pass';
}

export function writePolicy(mode: ReplicationMode, stage: Stage): IoPolicy {
  if (mode === 'primary') return stage === 'running' ? 'forward-record' : 'eio';
  switch (stage) {
    case 'none':
      return 'eio';
    case 'failover-failed':
      return 'route-by-allocation';
    default:
      return 'pass';
  }
}

export const MSG = {
  notRunning: 'Block replication is not running',
  runningOrDone: 'Block replication is running or done',
  ioError: 'I/O error occurred',
  backupCancelled: 'Backup job was cancelled unexpectedly',
  badMode: (node: ReplicationMode, got: ReplicationMode) =>
    `The parameter mode's value is invalid, needs ${MODE_NUMBER[node]}, but got ${MODE_NUMBER[got]}`,
  noActiveBacking: "Active disk doesn't have backing file",
  noHiddenBacking: "Hidden disk doesn't have backing file",
  noBackend: "The secondary disk doesn't have block backend",
  lengths: "Active disk, hidden disk, secondary disk's length are not the same",
  makeEmpty: "Active disk or hidden disk doesn't support make_empty",
  topId: 'No top_bs or it is invalid',
  blocker: 'Block device is in use by internal backup job',
  missingMode: 'Missing the option mode',
  missingTopId: 'Missing the option top-id',
  primaryTopId: 'The primary side does not support option top-id',
  activeEjected: (name: string) => `Active disk ${name} is ejected`,
  hiddenEjected: (name: string) => `Hidden disk ${name} is ejected`,
  failedToEmpty: (file: string, reason: string) => `Failed to empty ${file}: ${reason}`,
  failoverOnlyForStop: "Parameter 'failover' is only for stopping replication",
} as const;
