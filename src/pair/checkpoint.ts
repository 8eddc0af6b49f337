// The checkpoint barrier: hold the guest's writes at the primary, checkpoint the secondary,
// reset the primary's changed-regions record, release. The pause the guest sees is the whole
// barrier; its three steps are timed separately.

import { errorMessage } from '../errors.js';
import { QmpCommandError } from '../qmp/client.js';
import type { PairCore } from './core.js';
import { DISK_NODE, LOG_NODE } from './setup.js';

/** One checkpoint's timing: the pause the guest saw and its three steps. */
export interface CheckpointTimes {
  /** hold + secondary checkpoint + release */
  pauseMs: number;
  /** the secondary's xen-colo-do-checkpoint */
  checkpointMs: number;
  /** block-io-hold: a round trip plus the drain of in-flight writes */
  holdMs: number;
  /** block-io-release (with the changed-regions reset sent just before it) */
  releaseMs: number;
}

/** Runs one barrier; the caller has checked that the stage allows it. */
export async function runCheckpoint(core: PairCore): Promise<CheckpointTimes> {
  const p = core.primary!;
  const s = core.secondary!;
  const fail = (msg: string, e: unknown): never => {
    core.metrics.checkpointFailures++;
    core.lastError = msg;
    core.log('error', msg);
    throw e;
  };
  const t0 = process.hrtime.bigint();
  // Sent back to back with the hold (one monitor runs its commands in order): the primary's
  // replication state once its writes are drained, at no extra round trip.
  let forward: Promise<ReplicationEntry[]> | null = null;
  try {
    const held = core.call(p, 'block-io-hold', { 'node-name': DISK_NODE });
    forward = core.call(p, 'query-replication') as Promise<ReplicationEntry[]>;
    forward.catch(() => {});
    await held;
  } catch (e) {
    // A hold that timed out may still take effect later: release it whenever it does, so
    // that the guest's writes are never left held ("not held" errors are expected). A hold
    // the daemon refused ("already held") is not ours: releasing it would cut another
    // holder's barrier in the middle.
    if (!(e instanceof QmpCommandError)) void core.call(p, 'block-io-release', { 'node-name': DISK_NODE }, 60_000).catch(() => {});
    fail(`checkpoint failed: the hold on the primary failed: ${errorMessage(e)}`, e);
  }
  const t1 = process.hrtime.bigint();
  let err: unknown = null;
  // A write the primary failed to forward (its replication filter's sticky error: an I/O
  // timeout on the link, a refused request) is missing on the secondary, and the primary
  // acknowledged it all the same (the forward does not vote). The secondary must not take
  // its view for a checkpoint then: the barrier fails, the secondary keeps the last good
  // one (what a failover serves), and the primary's changed-regions record is kept.
  try {
    const bad = (await forward!).find((r) => r.mode === 'primary' && r.error !== undefined);
    if (bad) err = new ForwardError(`the primary's forward to the secondary failed (${bad.error}): the secondary lacks writes the primary acknowledged and keeps its last checkpoint`);
  } catch (e) {
    err = e;
  }
  // The secondary's dirty log forgets the forwarded writes this checkpoint confirms. Sent
  // back to back with the checkpoint (no extra round trip); even when the checkpoint fails
  // nothing is lost: what a failover then rolls back, its commit rewrites through the log.
  const sLog = err ? Promise.resolve() : core.call(s, 'x-dirty-log-checkpoint', { 'node-name': LOG_NODE[s.name] });
  // observed below; a rejection (a timeout) while the checkpoint is still awaited must not
  // be an unhandled one, which ends the supervisor's process
  sLog.catch(() => {});
  if (!err) {
    try {
      await core.call(s, 'xen-colo-do-checkpoint');
    } catch (e) {
      err = e;
    }
  }
  await sLog.catch((e: unknown) => {
    err ??= e;
  });
  const t2 = process.hrtime.bigint();
  // Still inside the barrier: the secondary now holds everything the primary changed, so
  // the primary's changed-regions record starts afresh. Sent back to back with the
  // release (one monitor runs its commands in order), so it costs no extra round trip.
  // The flushes waiting on the primary are covered now: released first, in the same batch.
  const commit = err || !core.insideBarrier ? Promise.resolve() : core.insideBarrier(p);
  const reset = err ? Promise.resolve() : core.call(p, 'x-replication-reset-changed');
  // the primary's dirty log likewise: what it holds before this point is on the secondary
  const pLog = err ? Promise.resolve() : core.call(p, 'x-dirty-log-checkpoint', { 'node-name': LOG_NODE[p.name] });
  await Promise.all([commit, reset, pLog, core.call(p, 'block-io-release', { 'node-name': DISK_NODE })]);
  const t3 = process.hrtime.bigint();
  const pauseMs = Number(t3 - t0) / 1e6;
  const checkpointMs = Number(t2 - t1) / 1e6;
  const times: CheckpointTimes = { pauseMs, checkpointMs, holdMs: Number(t1 - t0) / 1e6, releaseMs: Number(t3 - t2) / 1e6 };
  if (err) fail(`checkpoint failed: ${errorMessage(err)}`, err);
  core.metrics.checkpoints++;
  core.metrics.pause.observe(pauseMs / 1000);
  core.metrics.checkpointTime.observe(checkpointMs / 1000);
  return times;
}

type ReplicationEntry = { mode?: string; error?: string; 'bytes-copied': number; 'dirty-clusters': number; 'bytes-sent'?: number; 'bytes-received'?: number };

/** The primary's replication filter failed a forward: no checkpoint can confirm the secondary. */
export class ForwardError extends Error {
  readonly code = 'EIO' as const;
  override name = 'ForwardError';
}
const sum = (list: ReplicationEntry[], f: (x: ReplicationEntry) => number | undefined): number => list.reduce((a, x) => a + (f(x) ?? 0), 0);

/** Both sides' replication counters, for status and metrics: the secondary's hidden-disk
 *  copies and received bytes, the primary's sent bytes and the bytes written to its served disk. */
export async function refreshCounters(core: PairCore): Promise<void> {
  const [s, p, written] = await Promise.all([
    core.call(core.secondary!, 'query-replication') as Promise<ReplicationEntry[]>,
    core.call(core.primary!, 'query-replication') as Promise<ReplicationEntry[]>,
    core.call(core.primary!, 'x-query-node-written', { 'node-name': DISK_NODE }) as Promise<{ 'written-bytes': number }>,
  ]);
  core.metrics.hiddenCopiedBytes = sum(s, (x) => x['bytes-copied']);
  core.metrics.hiddenCopiedClusters = sum(s, (x) => x['dirty-clusters']);
  core.metrics.receivedBytes = sum(s, (x) => x['bytes-received']);
  core.metrics.sentBytes = sum(p, (x) => x['bytes-sent']);
  core.metrics.writtenBytes = written['written-bytes'];
}

/** Serialises checkpoint requests: one barrier at a time. A request arriving while one runs
 *  cannot join it (writes acknowledged after its release would be missing), so it joins the
 *  one follow-up barrier that starts when the running one ends; any number of requests
 *  arriving meanwhile share that follow-up. */
export class CheckpointQueue<T> {
  private running: Promise<T> | null = null;
  private next: Promise<T> | null = null;

  constructor(private readonly run: () => Promise<T>) {}

  get busy(): boolean {
    return this.running !== null;
  }

  /** The running barrier, if any (for shutdown and failover to wait on). */
  get current(): Promise<T> | null {
    return this.running;
  }

  request(): Promise<T> {
    if (this.next) return this.next;
    if (!this.running) return this.start();
    if (!this.next) {
      this.next = this.running.then(
        () => undefined,
        () => undefined,
      ).then(() => {
        this.next = null;
        return this.start();
      });
    }
    return this.next;
  }

  private start(): Promise<T> {
    const p = this.run();
    this.running = p;
    const clear = (): void => {
      if (this.running === p) this.running = null;
    };
    p.then(clear, clear);
    return p;
  }
}
