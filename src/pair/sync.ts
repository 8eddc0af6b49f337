// Copying a disk from one side to the other before replication starts, in the direction the
// generations decided: an `x-blockdev-resync` job, run on the primary's daemon, from the
// primary's disk onto the secondary's forward export or back. An incremental resync copies
// the union of the two disks' dirty-log records; a full one a single extent covering the disk.

import { InvalidArgumentError } from '../errors.js';
import type { QmpClient } from '../qmp/client.js';
import type { PairLog } from './core.js';

export type SyncProgress = (done: number, total: number, etaSeconds: number | null, what?: 'initial sync' | 'resync' | 'failover commit' | 'split-brain save') => void;

export interface ByteRange {
  offset: number;
  length: number;
}

/** What a resync job reported when it completed. */
export interface ResyncResult {
  extents: ByteRange[];
  /** total bytes of the extents */
  bytes: number;
  dataBytes: number;
  zeroedBytes: number;
  skippedZeroBytes: number;
}

/** The union of sorted or unsorted range lists: ascending, overlapping or touching runs merged. */
export function unionExtents(...lists: ReadonlyArray<readonly ByteRange[]>): ByteRange[] {
  const all = lists.flat().filter((r) => r.length > 0).sort((a, b) => a.offset - b.offset);
  const out: ByteRange[] = [];
  for (const r of all) {
    const last = out[out.length - 1];
    if (last && r.offset <= last.offset + last.length) last.length = Math.max(last.length, r.offset + r.length - last.offset);
    else out.push({ ...r });
  }
  return out;
}

/**
 * `extents` (ascending, as unionExtents returns them) with every gap of at most `gap` bytes
 * between two ranges filled: one request instead of two, at the price of copying the gap.
 * For a pair's resync the gap is clean, the same bytes on both disks (the records name a
 * superset of what differs), so copying it changes nothing on the target.
 */
export function coalesceExtents(extents: readonly ByteRange[], gap: number): ByteRange[] {
  const out: ByteRange[] = [];
  for (const r of extents) {
    const last = out[out.length - 1];
    if (last && r.offset < last.offset + last.length) throw new InvalidArgumentError(`coalesceExtents: range at ${r.offset} overlaps or precedes the one before it (not ascending)`);
    if (last && r.offset - (last.offset + last.length) <= gap) last.length = r.offset + r.length - last.offset;
    else out.push({ offset: r.offset, length: r.length });
  }
  return out;
}

const JOB = 'lockstep-sync';

/** A resync whose progress must survive its target's SIGKILL: the job flushes the target
 *  after every `flushBytes` copied, and each newly flushed mark is handed to `onFlushed`
 *  (one call at a time, in ascending order, the last one the end of the last range). */
export interface DurableProgress {
  flushBytes: number;
  onFlushed: (flushedUpTo: number) => Promise<void>;
}

/** Copies exactly `extents` from node `device` to node `target` of the daemon `p`. */
export async function resync(
  p: QmpClient,
  log: PairLog,
  onProgress: SyncProgress | undefined,
  device: string,
  target: string,
  extents: ByteRange[],
  targetIsZero: boolean,
  what: 'initial sync' | 'resync' | 'split-brain save',
  /** bytes/s (the job's speed; 0 or absent: unlimited) */
  speed?: number,
  durable?: DurableProgress,
): Promise<ResyncResult> {
  const started = Date.now();
  const bytes = extents.reduce((a, r) => a + r.length, 0);
  if (extents.length === 0) return { extents, bytes: 0, dataBytes: 0, zeroedBytes: 0, skippedZeroBytes: 0 };
  const done = p.waitEvent('BLOCK_JOB_COMPLETED', (d) => d.device === JOB, 24 * 3600_000);
  done.catch(() => {}); // observed below, unless the command itself fails first
  await p.execute('x-blockdev-resync', {
    'job-id': JOB,
    device,
    target,
    extents,
    'target-is-zero': targetIsZero,
    ...(speed ? { speed } : {}),
    ...(durable ? { 'flush-bytes': durable.flushBytes } : {}),
  });
  // the flushed marks, handed on one at a time: a mark is never reported after a larger one
  let reported = extents[0]!.offset;
  let handing: Promise<void> = Promise.resolve();
  let handFailure: unknown = null;
  let ended = false;
  const flushed = (upTo: number): void => {
    // a query answered after the job ended hands nothing on (the caller has moved on)
    if (!durable || ended || !(upTo > reported)) return;
    reported = upTo;
    handing = handing.then(async () => {
      if (handFailure !== null) return;
      try {
        await durable.onFlushed(upTo);
      } catch (e) {
        // nothing more is marked; thrown once the job ended (a target that cannot be
        // marked on its host is most likely gone, and the job fails with it)
        handFailure = e;
      }
    });
  };
  const timer = setInterval(() => {
    void p
      .execute('query-block-jobs')
      .then((list) => {
        const j = (list as Array<{ device: string; offset: number; len: number; 'x-flushed-up-to'?: number }>).find((x) => x.device === JOB);
        if (!j) return;
        const elapsed = (Date.now() - started) / 1000;
        onProgress?.(j.offset, j.len, j.offset > 0 ? (elapsed * (j.len - j.offset)) / j.offset : null, what);
        if (j['x-flushed-up-to'] !== undefined) flushed(j['x-flushed-up-to']);
      })
      .catch(() => {});
  }, 200);
  let ev: Record<string, unknown>;
  try {
    ev = (await done).data ?? {};
  } catch (e) {
    ended = true;
    throw e;
  } finally {
    clearInterval(timer);
  }
  // a failed job's flushed mark holds all the same (it only ever counts completed flushes)
  if (ev['x-flushed-up-to'] !== undefined) flushed(Number(ev['x-flushed-up-to']));
  ended = true;
  await handing;
  // the job's own failure first: a mark that could not be persisted follows from it
  if (ev.error) throw new Error(`the ${what} failed: ${String(ev.error)}`);
  if (handFailure !== null) throw handFailure;
  const r: ResyncResult = {
    extents,
    bytes,
    dataBytes: Number(ev['x-data-bytes'] ?? 0),
    zeroedBytes: Number(ev['x-zeroed-bytes'] ?? 0),
    skippedZeroBytes: Number(ev['x-skipped-zero-bytes'] ?? 0),
  };
  onProgress?.(bytes, bytes, 0, what);
  log('info', `${what} done`, { seconds: (Date.now() - started) / 1000, bytes, extents: extents.length, data: r.dataBytes, zeroed: r.zeroedBytes, skipped: r.skippedZeroBytes });
  return r;
}
