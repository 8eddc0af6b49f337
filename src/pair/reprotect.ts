// Re-protection while the primary keeps serving: a lost secondary that comes back (restarted
// here on one host, reached again at its QMP address on two) is resynced *live* and
// replication resumes, without the guest's writes ever stopping for longer than one barrier.
//
// The scheme (convergent passes, argued in docs/replication.md "Re-protection"):
//   0. tracking starts on the primary's dirty log (x-dirty-log-written): from here every
//      granule whose write *completes* is noted, in memory;
//   1. pass 0 copies the union of both disks' persistent records (what the primary changed
//      since the common generation, what the secondary changed that the primary never had),
//      its gaps of at most MERGE_GAP filled (clean bytes, equal on both disks: one larger
//      request costs less than two small ones over NBD), by one job that flushes the
//      target behind the copy and reports the flushed mark for the caller to persist;
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
import { DISK_NODE, LOG_NODE, forwardNode } from './setup.js';
import type { Side } from './sides.js';
import { coalesceExtents, resync, unionExtents, type ByteRange, type SyncProgress } from './sync.js';
import type { SocketAddress } from '../util/socket-address.js';

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
  /** the union of both records (or what a resumed resync had left): pass 0 copies it with
   *  its gaps of at most the merge gap filled */
  union: ByteRange[];
  /** per pass: bytes of its extents, and how the job wrote them (data, zeroes, or nothing
   *  where both sides read zeroes already) */
  passes: Array<{ extents: ByteRange[]; bytes: number; dataBytes: number; zeroedBytes: number; skippedZeroBytes: number }>;
  /** bytes copied inside the barrier */
  barrierBytes: number;
  /** the guest's writes were held this long */
  pauseMs: number;
}

export interface LiveResyncOptions {
  forward: SocketAddress;
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
  /** an interrupted resync's pending ranges (its target died): copied first, with what the
   *  primary wrote since, instead of the records' union, when the primary still tracks */
  resume?: ByteRange[] | undefined;
  /** a pass's job flushes the target after every this many bytes copied, without stopping
   *  the copy, and the flushed mark advances: a resync whose target dies copies again about
   *  this much, plus what was copied while the last flush ran (default PIECE_BYTES) */
  pieceBytes?: number | undefined;
  /** the running pass (its number and extents) and the offset below which every byte of it
   *  is copied and flushed on the target: at its start and after each flush; `durable`
   *  (outside the barrier): the caller persists it, so that a later attempt resumes there */
  onDone?: (mark: PassMark, durable: boolean) => Promise<void>;
}

/** Where a live resync stands: pass `pass` copies `extents`; every byte of them below
 *  `doneUpTo` is on the target, flushed. */
export interface PassMark {
  pass: number;
  extents: ByteRange[];
  doneUpTo: number;
}

/** The part of `extents` at or above `from`. */
export function clipExtents(extents: readonly ByteRange[], from: number): ByteRange[] {
  const out: ByteRange[] = [];
  for (const e of extents) {
    const end = e.offset + e.length;
    if (end <= from) continue;
    const start = Math.max(e.offset, from);
    out.push({ offset: start, length: end - start });
  }
  return out;
}

/** Default piece of a pass: the target is flushed and the mark persisted after each. */
export const PIECE_BYTES = 64 * 1024 * 1024;

/**
 * Largest gap filled between two ranges of a pass. A scattered record (random 4 KiB
 * writes: 64 KiB granules with one- or two-granule gaps) otherwise becomes thousands of
 * requests whose round trips, not their bytes, set the time; a gap this size costs about
 * what one request's round trip does (measured in bench/reprotect.ts, docs/benchmarks.md).
 */
export const MERGE_GAP = 128 * 1024;

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

/** Removes what a live resync left on the primary (after a failure): its job and peer node;
 *  its write tracking too, unless a later attempt is to resume from where it stopped. */
export async function cleanUpResync(core: PairCore, p: Side, keepTracking = false): Promise<void> {
  if (!p.alive) return;
  await core.call(p, 'block-job-cancel', { device: 'lockstep-sync', force: true }).catch(() => {});
  if (!keepTracking) await core.call(p, 'x-dirty-log-written', { 'node-name': LOG_NODE[p.name], stop: true }).catch(() => {});
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
  const track = async (stop = false): Promise<{ extents: ByteRange[]; tracking: boolean }> =>
    (await core.call(p, 'x-dirty-log-written', { 'node-name': LOG_NODE[p.name], stop })) as { extents: ByteRange[]; tracking: boolean };
  const written = async (stop = false): Promise<ByteRange[]> => (await track(stop)).extents;
  await core.call(p, 'blockdev-add', { 'node-name': SYNC_PEER, ...forwardNode(o.forward, o.clientCreds, 0) });
  // tracking first, then the records: a write completing in between is in both. Tracking
  // that still runs (an interrupted resync) answers what completed since its last pass began
  const first = await track();
  let union: ByteRange[];
  if (o.resume && first.tracking) {
    // the interrupted pass's rest, and every granule written since that pass began: each
    // granule it copied before that is flushed on the target and unchanged since
    union = unionExtents(o.resume, first.extents);
    core.log('info', `resuming the interrupted resync: ${bytesOf(o.resume)} bytes of its pass were left, ${bytesOf(first.extents)} bytes written since it began`);
  } else if (o.full) union = [{ offset: 0, length: o.size }];
  else {
    const records = await Promise.all(
      [p, s].map(async (side) => ((await core.call(side, 'x-dirty-log-query', { 'node-name': LOG_NODE[side.name] })) as { extents: ByteRange[] }).extents),
    );
    union = unionExtents(...records);
  }
  const result: LiveResyncResult = { union, passes: [], barrierBytes: 0, pauseMs: 0 };
  const gap = MERGE_GAP;
  // what each pass copies: its ranges and the gaps filled between them
  let next = coalesceExtents(union, gap);
  const prog = o.progress;
  prog.done = 0;
  prog.total = bytesOf(next);
  prog.pass = 0;
  const started = Date.now();
  const quiet = (): void => {};
  // one pass, one job: it flushes the target after every piece behind the copy, and each
  // flushed mark is handed to onDone (a SIGKILLed qcow2 loses what it had not flushed).
  // The pass's ranges are marked in the target's own dirty log first, in one persist: each
  // first write into a granule would otherwise wait for a persist of its own there (a
  // superset of what the copy writes, dropped at the barrier's checkpoint like the rest)
  const copy = async (extents: ByteRange[], speed: number | undefined, durable: boolean): Promise<void> => {
    const t0 = Date.now();
    const pass = { extents, bytes: 0, dataBytes: 0, zeroedBytes: 0, skippedZeroBytes: 0 };
    const n = result.passes.length;
    const last = extents[extents.length - 1];
    await o.onDone?.({ pass: n, extents, doneUpTo: extents[0]?.offset ?? 0 }, durable);
    if (extents.length > 0) await core.call(s, 'x-dirty-log-mark', { 'node-name': LOG_NODE[s.name], extents });
    const base = prog.done;
    const onPass: SyncProgress = (done) => {
      prog.done = base + done;
      const elapsed = (Date.now() - started) / 1000;
      prog['eta-seconds'] = prog.done > 0 ? (elapsed * (prog.total - prog.done)) / prog.done : null;
      o.onProgress?.(prog.done, prog.total, prog['eta-seconds'], 'resync');
    };
    const marks = durable ? { flushBytes: o.pieceBytes ?? PIECE_BYTES, onFlushed: async (upTo: number) => o.onDone?.({ pass: n, extents, doneUpTo: upTo }, true) } : undefined;
    const r = await resync(p.qmp, quiet, onPass, LOG_NODE[p.name], SYNC_PEER, extents, false, 'resync', speed, marks);
    prog.done = base + r.bytes;
    pass.bytes = r.bytes;
    pass.dataBytes = r.dataBytes;
    pass.zeroedBytes = r.zeroedBytes;
    pass.skippedZeroBytes = r.skippedZeroBytes;
    // the barrier's pass: its end (nothing persisted); a durable pass got it from the job
    if (!durable && last) await o.onDone?.({ pass: n, extents, doneUpTo: last.offset + last.length }, false);
    result.passes.push(pass);
    core.log('info', 'resync pass done', { pass: result.passes.length - 1, seconds: (Date.now() - t0) / 1000, bytes: pass.bytes, data: pass.dataBytes, zeroed: pass.zeroedBytes, ranges: extents.length });
  };
  for (;;) {
    await copy(next, o.speed, true);
    next = coalesceExtents(await written(), gap);
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
    // tracking goes on until the end: a failure in here leaves `rest` to resume from
    const rest = coalesceExtents(unionExtents(next, await written()), gap);
    prog.total += bytesOf(rest);
    result.barrierBytes = bytesOf(rest);
    // one job, nothing persisted: the guest's writes are held meanwhile
    if (rest.length > 0) await copy(rest, undefined, false);
    await startReplication(p.qmp, s.qmp, o);
    // the data is on the peer: both records may drop what they hold (lazily)
    await core.call(s, 'x-dirty-log-checkpoint', { 'node-name': LOG_NODE[s.name] });
    await core.call(p, 'x-dirty-log-checkpoint', { 'node-name': LOG_NODE[p.name] });
    await o.insideBarrier?.();
  } finally {
    await core.call(p, 'block-io-release', { 'node-name': DISK_NODE }).catch(() => {});
    result.pauseMs = Date.now() - t0;
  }
  // replication covers every write from the release on
  await written(true).catch(() => {});
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
