// The two internal jobs replication runs, behind a narrow interface: copy-before-write from
// the secondary disk into the hidden disk (backup sync=none), and the failover's active
// commit of active+hidden into the secondary disk. Both are internal (decision 11 in
// docs/replication.md): not listed by query-jobs, no events.

import type { BlockGraph } from '../block/graph.js';
import type { BlockNode } from '../block/node.js';
import type { BlockError } from '../errors.js';
import { JobManager } from '../jobs/job.js';
import { startBackup } from '../jobs/backup.js';
import { startCommit } from '../jobs/commit.js';

export interface JobEnd {
  ret: 0 | BlockError;
  cancelled: boolean;
}

export interface CopyJobHandle {
  /** the copy-before-write filter above the secondary disk */
  readonly filter: BlockNode;
  readonly done: Promise<JobEnd>;
  /** clusters copied since the last reset */
  readonly copiedClusters: number;
  /** bytes copied since the job started */
  readonly bytesCopied: number;
  /** every cluster "not yet copied", with no write or copy in flight */
  resetBitmap(): Promise<void>;
  /** ends the job and removes the filter */
  cancel(): Promise<void>;
}

export interface CommitJobHandle {
  readonly done: Promise<JobEnd>;
  cancel(): Promise<void>;
  progress(): { current: number; total: number };
}

export interface ReplicationJobs {
  startCopyBeforeWrite(source: BlockNode, target: BlockNode): Promise<CopyJobHandle>;
  startActiveCommit(top: BlockNode, base: BlockNode): Promise<CommitJobHandle>;
}

declare module '../block/graph.js' {
  interface GraphServices {
    /** the graph's one job manager, shared by the monitor's jobs and replication's own */
    jobs?: JobManager;
  }
}

/** The graph's job manager (created on first use; the daemon wires the same one). */
export function jobManagerOf(graph: BlockGraph): JobManager {
  return (graph.services.jobs ??= new JobManager(graph));
}

export function jobsFor(graph: BlockGraph): ReplicationJobs {
  return {
    async startCopyBeforeWrite(source, target) {
      const job = await startBackup(jobManagerOf(graph), { source, target, sync: 'none', internal: true });
      return {
        get filter() {
          return job.filter;
        },
        done: job.done,
        get copiedClusters() {
          return job.copiedClusters;
        },
        get bytesCopied() {
          return job.bytesCopied;
        },
        resetBitmap: () => job.checkpoint(),
        cancel: async () => {
          await job.cancel(true);
        },
      };
    },
    async startActiveCommit(top, base) {
      const job = await startCommit(jobManagerOf(graph), { top, base, active: true, autoComplete: true, internal: true });
      return {
        done: job.done,
        cancel: async () => {
          await job.cancel();
        },
        progress: () => ({ current: job.progressCurrent, total: job.progressTotal }),
      };
    },
  };
}
