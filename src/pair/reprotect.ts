// Re-protection while the primary keeps serving: a lost secondary that comes back (restarted
// here on one host, reached again at its QMP address on two) is resynced *live* and
// replication resumes, without the guest's writes ever stopping for longer than one barrier.
//
// The scheme (convergent passes, argued in docs/replication.md "Re-protection"):
//   0. tracking starts on the primary's dirty log (x-dirty-log-written): from here every
//      granule whose write *completes* is noted, in memory;
//   1. pass 0 copies the union of both disks' persistent records (what the primary changed
//      since the common generation, what the secondary changed that the primary never had);
//   2. each later pass copies what completed during the previous pass, until that is small;
//   3. inside a barrier (the primary's served node held, in-flight writes drained) the last
//      remainder is copied, replication is started on both sides (secondary first, as at
//      start) and both dirty logs are told the data is on the peer; then the release.
// A copy that read granule g before a write to g landed is repeated: that write completed
// after the pass started, so g is in the next pass (or in the barrier's remainder). Nothing
// drops a persistent record before the barrier, so a crash at any moment leaves the records
// a superset of what differs, and the secondary's disk stays marked inconsistent until the
// generations record both disks in step.

import { errorMessage } from '../errors.js';
import type { QmpClient } from '../qmp/client.js';
import type { PairCore } from './core.js';
import { DISK_NODE, LOG_NODE, PRIMARY_LOG, forwardNode, type ForwardAddress } from './setup.js';
import type { Side } from './sides.js';
import { resync, unionExtents, type ByteRange, type SyncProgress } from './sync.js';

/** The peer node a live resync writes through (an NBD client of the secondary's forward export). */
export const SYNC_PEER = 'sync-peer';
export const REPLICATION_NODE = 'replication0';
/** A pass that has at most this much left to copy is the last one, inside the barrier. */
export const FINAL_PASS_BYTES = 8 * 1024 * 1024;
/** After this many passes the barrier copies whatever is left (a write load faster than the copy). */
export const MAX_PASSES = 8;

export interface ResyncProgress {
  /** bytes copied so far, over every pass */
  done: number;
  /** bytes to copy: pass 0's, plus each later pass's when it starts */
  total: number;
  'eta-seconds': number | null;
  pass: number;
}

/** What a live resync copied: per pass (the last one inside the barrier). */
export interface LiveResyncResult {
  /** pass 0's extents: the union of both records */
  union: ByteRange[];
  passes: Array<{ extents: ByteRange[]; bytes: number; dataBytes: number; zeroedBytes: number }>;
  /** bytes copied inside the barrier */
  barrierBytes: number;
  /** the guest's writes were held this long */
  pauseMs: number;
}

export interface LiveResyncOptions {
  forward: ForwardAddress;
  clientCreds: string | undefined;
  /** the replication filter's forward I/O timeout, s */
  ioTimeoutS: number;
  /** pass 0 copies the whole disk (no usable records) */
  full: boolean;
  size: number;
  /** bytes/s for the copy passes (not the barrier's remainder) */
  speed: number | undefined;
  onProgress: SyncProgress | undefined;
  /** the live progress, updated in place (status reads it) */
  progress: ResyncProgress;
  /** inside the barrier, once replication runs, before the release (output commit) */
  insideBarrier?: () => Promise<void>;
}

const bytesOf = (e: readonly ByteRange[]): number => e.reduce((a, r) => a + r.length, 0);

/** Starts replication with the secondary already built and in step with the primary:
 *  the secondary first, so that no forwarded write reaches its disk before its
 *  copy-before-write filter is in place. The same steps at start and at re-protection. */
export async function startReplication(p: QmpClient, s: QmpClient, o: Pick<LiveResyncOptions, 'forward' | 'clientCreds' | 'ioTimeoutS'>): Promise<void> {
  await s.execute('xen-set-replication', { enable: true, primary: false });
  await p.execute('blockdev-add', { driver: 'replication', 'node-name': REPLICATION_NODE, mode: 'primary', file: forwardNode(o.forward, o.clientCreds, o.ioTimeoutS) });
  await p.execute('x-blockdev-change', { parent: DISK_NODE, node: REPLICATION_NODE });
  await p.execute('xen-set-replication', { enable: true, primary: true });
}

/** Takes the lost secondary's replication filter out of the primary's quorum (if there). */
export async function detachReplication(core: PairCore, p: Side): Promise<void> {
  const nodes = (await core.call(p, 'query-named-block-nodes', { flat: true })) as Array<{ 'node-name': string }>;
  if (!nodes.some((n) => n['node-name'] === REPLICATION_NODE)) return;
  // the quorum names its children children.0 (the local disk's log) and children.1
  await core.call(p, 'x-blockdev-change', { parent: DISK_NODE, child: 'children.1' });
  await core.call(p, 'blockdev-del', { 'node-name': REPLICATION_NODE });
}

/** Removes what a live resync left on the primary (after a failure): its job and peer node. */
export async function cleanUpResync(core: PairCore, p: Side): Promise<void> {
  if (!p.alive) return;
  await core.call(p, 'block-job-cancel', { device: 'lockstep-sync', force: true }).catch(() => {});
  await core.call(p, 'x-dirty-log-written', { 'node-name': PRIMARY_LOG, stop: true }).catch(() => {});
  for (let i = 0; i < 50; i++) {
    try {
      await core.call(p, 'blockdev-del', { 'node-name': SYNC_PEER });
      return;
    } catch (e) {
      if (/find|not found/i.test(errorMessage(e))) return;
      // still in use by the cancelled job for a moment
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}

/**
 * Copies the primary's disk onto the secondary's (built, exported, not replicating yet)
 * while the primary serves, then starts replication inside one barrier. The caller has
 * marked the secondary's disk inconsistent and removed any old replication filter.
 */
export async function liveResync(core: PairCore, p: Side, s: Side, o: LiveResyncOptions): Promise<LiveResyncResult> {
  const written = async (stop = false): Promise<ByteRange[]> =>
    ((await core.call(p, 'x-dirty-log-written', { 'node-name': PRIMARY_LOG, stop })) as { extents: ByteRange[] }).extents;
  await core.call(p, 'blockdev-add', { 'node-name': SYNC_PEER, ...forwardNode(o.forward, o.clientCreds, 0) });
  // tracking first, then the records: a write completing in between is in both
  await written();
  let union: ByteRange[];
  if (o.full) union = [{ offset: 0, length: o.size }];
  else {
    const records = await Promise.all(
      ([[p, 'primary'], [s, 'secondary']] as const).map(async ([side, n]) => ((await core.call(side, 'x-dirty-log-query', { 'node-name': LOG_NODE[n] })) as { extents: ByteRange[] }).extents),
    );
    union = unionExtents(...records);
  }
  const result: LiveResyncResult = { union, passes: [], barrierBytes: 0, pauseMs: 0 };
  const prog = o.progress;
  prog.done = 0;
  prog.total = bytesOf(union);
  prog.pass = 0;
  const started = Date.now();
  const copy = async (extents: ByteRange[], speed: number | undefined): Promise<void> => {
    const base = prog.done;
    const onPass: SyncProgress = (done) => {
      prog.done = base + done;
      const elapsed = (Date.now() - started) / 1000;
      prog['eta-seconds'] = prog.done > 0 ? (elapsed * (prog.total - prog.done)) / prog.done : null;
      o.onProgress?.(prog.done, prog.total, prog['eta-seconds'], 'resync');
    };
    const r = await resync(p.qmp, core.log, onPass, PRIMARY_LOG, SYNC_PEER, extents, false, 'resync', speed);
    prog.done = base + r.bytes;
    result.passes.push({ extents, bytes: r.bytes, dataBytes: r.dataBytes, zeroedBytes: r.zeroedBytes });
  };
  let next = union;
  for (;;) {
    await copy(next, o.speed);
    next = await written();
    const left = bytesOf(next);
    if (left <= FINAL_PASS_BYTES || result.passes.length >= MAX_PASSES) break;
    prog.pass++;
    prog.total += left;
    core.log('info', `resync pass ${prog.pass}: ${left} bytes were written during the last pass`);
  }
  // the barrier: nothing completes on the primary's disk until the release
  const t0 = Date.now();
  await core.call(p, 'block-io-hold', { 'node-name': DISK_NODE });
  try {
    const rest = unionExtents(next, await written(true));
    prog.total += bytesOf(rest);
    result.barrierBytes = bytesOf(rest);
    if (rest.length > 0) await copy(rest, undefined);
    await startReplication(p.qmp, s.qmp, o);
    // the data is on the peer: both records may drop what they hold (lazily)
    await core.call(s, 'x-dirty-log-checkpoint', { 'node-name': LOG_NODE.secondary });
    await core.call(p, 'x-dirty-log-checkpoint', { 'node-name': LOG_NODE.primary });
    await o.insideBarrier?.();
  } finally {
    await core.call(p, 'block-io-release', { 'node-name': DISK_NODE }).catch(() => {});
    result.pauseMs = Date.now() - t0;
  }
  await core.call(p, 'blockdev-del', { 'node-name': SYNC_PEER }).catch((e: unknown) => core.log('warn', `cannot remove the resync's peer node: ${errorMessage(e)}`));
  return result;
}

/** The generations forbid copying onto the returning secondary: not retried. */
export class ReprotectRefused extends Error {
  readonly code = 'EREFUSED';
}

/** Delays between attempts to bring a lost secondary back: 1 s doubling up to 30 s. */
export class Backoff {
  private attempt = 0;
  constructor(
    private readonly firstMs = 1000,
    private readonly maxMs = 30_000,
  ) {}

  get attempts(): number {
    return this.attempt;
  }

  next(): number {
    const d = Math.min(this.maxMs, this.firstMs * 2 ** this.attempt);
    this.attempt++;
    return d;
  }

  reset(): void {
    this.attempt = 0;
  }
}
