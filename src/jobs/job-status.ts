// Job statuses, verbs and their tables (QEMU 7.2's job.c JobSTT and JobVerbTable), and the
// QAPI shapes of job queries. Pure data: the Job class in job.ts drives the transitions.

import type { BlockError } from '../errors.js';
import type { ErrorAction } from '../block/block-copy.js';

/** the copy engine's (block/block-copy.ts): what a failed copy makes a job do */
export type { ErrorAction };

export type JobStatus =
  | 'undefined'
  | 'created'
  | 'running'
  | 'paused'
  | 'ready'
  | 'standby'
  | 'waiting'
  | 'pending'
  | 'aborting'
  | 'concluded'
  | 'null';

/** QEMU 7.2's verbs ('change' arrived in 8.2 and is not here). */
export type JobVerb = 'cancel' | 'pause' | 'resume' | 'set-speed' | 'complete' | 'finalize' | 'dismiss';

export type JobType = 'commit' | 'stream' | 'mirror' | 'backup' | 'create' | 'amend' | 'snapshot-load' | 'snapshot-save' | 'snapshot-delete' | 'resync';

/** QAPI BlockdevOnError. `auto` behaves as `report` for jobs. */
export type OnError = 'report' | 'ignore' | 'enospc' | 'stop' | 'auto';
export const ON_ERROR_VALUES: readonly OnError[] = ['report', 'ignore', 'enospc', 'stop', 'auto'];

export type IoStatus = 'ok' | 'failed' | 'nospace';

export const JOB_STATUSES: readonly JobStatus[] = [
  'undefined',
  'created',
  'running',
  'paused',
  'ready',
  'standby',
  'waiting',
  'pending',
  'aborting',
  'concluded',
  'null',
];

export const JOB_VERBS: readonly JobVerb[] = ['cancel', 'pause', 'resume', 'set-speed', 'complete', 'finalize', 'dismiss'];

/** Allowed status transitions (QEMU's JobSTT). */
export const JOB_TRANSITIONS: Readonly<Record<JobStatus, readonly JobStatus[]>> = {
  undefined: ['created'],
  created: ['running', 'aborting', 'null'],
  running: ['paused', 'ready', 'waiting', 'aborting'],
  paused: ['running'],
  ready: ['standby', 'waiting', 'aborting'],
  standby: ['ready'],
  waiting: ['pending', 'aborting'],
  pending: ['aborting', 'concluded'],
  aborting: ['aborting', 'concluded'],
  concluded: ['null'],
  null: [],
};

/** The statuses in which each verb is accepted (QEMU's JobVerbTable). */
export const JOB_VERB_TABLE: Readonly<Record<JobVerb, readonly JobStatus[]>> = {
  cancel: ['created', 'running', 'paused', 'ready', 'standby', 'waiting', 'pending'],
  pause: ['created', 'running', 'paused', 'ready', 'standby'],
  resume: ['created', 'running', 'paused', 'ready', 'standby'],
  'set-speed': ['created', 'running', 'paused', 'ready', 'standby'],
  complete: ['ready'],
  finalize: ['pending'],
  dismiss: ['concluded'],
};

export function canTransition(from: JobStatus, to: JobStatus): boolean {
  return JOB_TRANSITIONS[from].includes(to);
}

export function verbAllowed(verb: JobVerb, status: JobStatus): boolean {
  return JOB_VERB_TABLE[verb].includes(status);
}

export interface JobResult {
  /** 0 on success, else the job's error (ECANCELED when cancelled) */
  ret: 0 | BlockError;
  /** the job was cancelled (a soft cancel of a READY mirror counts as completion) */
  cancelled: boolean;
}

export interface JobOptions {
  jobId?: string;
  /** replication's own jobs: never listed, no events (decision 11 in docs/replication.md) */
  internal?: boolean;
  /** bytes per second, 0 = unlimited */
  speed?: number;
  autoFinalize?: boolean;
  autoDismiss?: boolean;
  onSourceError?: OnError;
  onTargetError?: OnError;
  /** progress callback (for internal jobs, whose creator reports progress itself) */
  onProgress?: (current: number, total: number) => void;
}

/** QAPI BlockJobInfo (query-block-jobs). */
export interface BlockJobInfo {
  type: JobType;
  device: string;
  len: number;
  offset: number;
  busy: boolean;
  paused: boolean;
  speed: number;
  'io-status': IoStatus;
  ready: boolean;
  status: JobStatus;
  'auto-finalize': boolean;
  'auto-dismiss': boolean;
  error?: string;
}

/** QAPI JobInfo (query-jobs). */
export interface JobInfo {
  id: string;
  type: JobType;
  status: JobStatus;
  'current-progress': number;
  'total-progress': number;
  error?: string;
}
