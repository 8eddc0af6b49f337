// The two internal jobs replication runs, behind a narrow interface: copy-before-write from
// the secondary disk into the hidden disk (backup sync=none), and the failover's active
// commit of active+hidden into the secondary disk. Both are internal (decision 11): not
// listed by query-jobs, no events.

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
  /** bytes copied since the last reset */
  readonly bytesCopied: number;
  /** every cluster "not yet copied"; the caller holds I/O */
  resetBitmap(): void;
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

export function jobsFor(graph: BlockGraph): ReplicationJobs {
  const mgr = JobManager.of(graph);
  return {
    async startCopyBeforeWrite(source, target) {
      const job = startBackup(mgr, { source, target, sync: 'none', internal: true });
      return {
        get filter() {
          return job.filterNode;
        },
        done: job.done,
        get copiedClusters() {
          return job.copiedClusters;
        },
        get bytesCopied() {
          return job.copiedClusters * job.clusterSize;
        },
        resetBitmap: () => job.resetBitmap(),
        cancel: () => job.cancel(true),
      };
    },
    async startActiveCommit(top, base) {
      const job = startCommit(mgr, { top, base, active: true, autoComplete: true, internal: true });
      return {
        done: job.done,
        cancel: () => job.cancel(),
        progress: () => job.progress(),
      };
    },
  };
}
