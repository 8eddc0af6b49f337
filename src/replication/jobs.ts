// The two internal jobs replication runs, behind the narrow interface the replication filter
// declares (block/filters/replication/filter.ts): copy-before-write from the secondary disk
// into the hidden disk (backup sync=none), and the failover's active commit of active+hidden
// into the secondary disk. Both are internal (decision 11 in docs/replication.md): not listed
// by query-jobs, no events. The filter is in the block layer, below the jobs, so it gets them
// as the graph service `replicationJobs` that wireReplicationJobs installs.

import type { BlockGraph } from '../block/graph.js';
import type { ReplicationJobs } from '../block/filters/replication/filter.js';
import { JobManager } from '../jobs/job.js';
import { startBackup } from '../jobs/backup.js';
import { startCommit } from '../jobs/commit.js';

declare module '../block/graph.js' {
  interface GraphServices {
    /** the graph's one job manager, shared by the monitor's jobs and replication's own */
    jobs?: JobManager;
  }
}

/**
 * The failover commit flushes the secondary disk behind its copy every this many bytes (and
 * the overlays once at its start), so that the flushes that end it find little left to
 * write (issue 18: the final flush was a third of the failover).
 */
export const FAILOVER_FLUSH_BEHIND = 32 * 1024 * 1024;

/** The graph's job manager (created on first use; the daemon wires the same one). */
export function jobManagerOf(graph: BlockGraph): JobManager {
  wireReplicationJobs(graph);
  return (graph.services.jobs ??= new JobManager(graph));
}

/** Hands the graph's replication nodes their jobs (once per graph). */
export function wireReplicationJobs(graph: BlockGraph): void {
  graph.services.replicationJobs ??= jobsFor(graph);
}

export function jobsFor(graph: BlockGraph): ReplicationJobs {
  return {
    async startCopyBeforeWrite(source, target, copyUnit) {
      const job = await startBackup(jobManagerOf(graph), { source, target, sync: 'none', internal: true, ...(copyUnit !== undefined ? { copyUnit } : {}) });
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
      const job = await startCommit(jobManagerOf(graph), { top, base, active: true, autoComplete: true, internal: true, flushBehind: FAILOVER_FLUSH_BEHIND });
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
