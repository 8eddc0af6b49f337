// The replication registry of one graph and the four *_all operations (QEMU's
// replication_*_all, with decision 7 in docs/replication.md) over the graph's replication
// nodes, newest first as in QEMU (the filter keeps that list as it opens and closes them,
// block/filters/replication/filter.ts). Unlike QEMU:
// - startAll is all-or-nothing: when a node fails to start, every node this call started
//   (and the failing one) goes back to stage NONE, and the first error is returned;
// - stopAll, doCheckpointAll and getErrorAll visit every node and return the first error.

import type { BlockGraph } from '../block/graph.js';
import type { ReplicationMode } from '../block/filters/replication/state.js';
import { replicationStates, type ReplicationState, type ReplicationStatus } from '../block/filters/replication/filter.js';
import { wireReplicationJobs } from './jobs.js';

export class ReplicationRegistry {
  constructor(private readonly graph: BlockGraph) {}

  private get entries(): readonly ReplicationState[] {
    return replicationStates(this.graph);
  }

  /** Newest first. */
  list(): readonly ReplicationState[] {
    return this.entries;
  }

  async startAll(mode: ReplicationMode): Promise<void> {
    const started: ReplicationState[] = [];
    for (const s of [...this.entries]) {
      const wasNone = s.stage === 'none';
      try {
        await s.start(mode);
      } catch (e) {
        for (const x of started.reverse()) await x.rollbackStart().catch(() => {});
        throw e;
      }
      if (wasNone && s.stage === 'running') started.push(s);
    }
  }

  private async visitAll(op: (s: ReplicationState) => Promise<void> | void): Promise<void> {
    let first: unknown = null;
    for (const s of [...this.entries]) {
      try {
        await op(s);
      } catch (e) {
        first ??= e;
      }
    }
    if (first !== null) throw first;
  }

  doCheckpointAll(): Promise<void> {
    return this.visitAll((s) => s.doCheckpoint());
  }

  getErrorAll(): Promise<void> {
    return this.visitAll((s) => s.getError());
  }

  stopAll(failover: boolean): Promise<void> {
    return this.visitAll((s) => s.stop(failover));
  }

  query(): ReplicationStatus[] {
    return this.entries.map((s) => s.status());
  }
}

declare module '../block/graph.js' {
  interface GraphServices {
    /** the graph's replication registry (replicationRegistry) */
    replication?: ReplicationRegistry;
  }
}

/**
 * The graph's registry (created on first use, stored on the graph, never global); from then
 * on the graph's replication nodes can start their jobs.
 */
export function replicationRegistry(graph: BlockGraph): ReplicationRegistry {
  wireReplicationJobs(graph);
  return (graph.services.replication ??= new ReplicationRegistry(graph));
}
