// The pair's two disks and their generation records as the supervisor keeps them: loaded at
// start (a disk created now gets a just-created record before anything else happens), compared
// before anything is copied, and rewritten at each change of generation (in step after a sync,
// a failover survivor, a primary that lost its secondary).

import { QmpCommandError } from '../qmp/client.js';
import {
  compareGenerations,
  confirmedUpToDate,
  outdateBy,
  inStep,
  justCreated,
  newId,
  startGeneration,
  JUST_CREATED,
  type DiskMeta,
  type DiskRole,
  type PairSideName,
  type SyncDecision,
} from './generations.js';
import { readMeta, writeMeta } from './meta-store.js';
import type { PairCore } from './core.js';
import type { Side } from './sides.js';

export const DISK_FILE: Record<PairSideName, string> = { primary: 'primary.qcow2', secondary: 'secondary.qcow2' };

export class PairDiskError extends Error {
  constructor(
    readonly code: 'ENOMETA' | 'ESPLITBRAIN' | 'EUNRELATED' | 'EREFUSED',
    message: string,
  ) {
    super(message);
  }
}

export interface PairDisk {
  side: Side;
  name: PairSideName;
  /** null until loaded; stays null (with `kept` false) on a daemon without x-meta-read */
  meta: DiskMeta | null;
  /** the daemon keeps generation records (a local side always does) */
  kept: boolean;
}

type Call = (side: Side, cmd: string, args: Record<string, unknown>) => Promise<unknown>;

/** Loads a disk's record; a disk created just now gets (and persists) a just-created one. */
export async function loadDisk(core: PairCore, side: Side, name: PairSideName, created: boolean, size: number): Promise<PairDisk> {
  const call: Call = (s, c, a) => core.call(s, c, a);
  const disk: PairDisk = { side, name, meta: null, kept: true };
  try {
    if (created) {
      disk.meta = justCreated(DISK_FILE[name], size, name);
      await writeMeta(side, disk.meta, call);
    } else {
      disk.meta = await readMeta(side, DISK_FILE[name], call);
    }
  } catch (e) {
    if (e instanceof QmpCommandError && e.errorClass === 'CommandNotFound') {
      // an older daemon on another host: the pair runs as before (full sync from the primary)
      core.log('warn', `the ${name} daemon keeps no generation records (it has no ${e.command}): its disk is not compared, the primary's is copied whole`);
      disk.meta = null;
      disk.kept = false;
      return disk;
    }
    throw e;
  }
  return disk;
}

export async function saveDisk(core: PairCore, d: PairDisk, meta: DiskMeta): Promise<void> {
  d.meta = meta;
  if (d.kept) await writeMeta(d.side, meta, (s, c, a) => core.call(s, c, a));
}

/** What to do at start, or why not: forced by the operator, or from the two records. */
export function decideStart(p: PairDisk, s: PairDisk, forceCurrent: PairSideName | undefined): SyncDecision {
  if (forceCurrent) return { kind: 'full', source: forceCurrent, targetIsZero: false, reason: `the operator declared the ${forceCurrent} disk current (--force-current)` };
  if (!p.kept || !s.kept) return { kind: 'full', source: 'primary', targetIsZero: false, reason: 'a daemon keeps no generation records' };
  return compareGenerations(p.meta, s.meta);
}

/** The error a refused start gives: what was found and the command that settles it. */
export function refusal(d: SyncDecision): PairDiskError | null {
  switch (d.kind) {
    case 'no-metadata':
      return new PairDiskError(
        'ENOMETA',
        `${d.reason}. If you know which disk holds the data to keep, declare it with ` +
          '`lockstep pair --force-current primary` or `lockstep pair --force-current secondary` ' +
          '(the other disk is then overwritten by a full sync)',
      );
    case 'split-brain':
      return new PairDiskError('ESPLITBRAIN', `split brain: ${d.reason}; neither disk was changed. Keep one with --force-current primary|secondary (the other disk is overwritten)`);
    case 'unrelated':
      return new PairDiskError('EUNRELATED', `refusing to pair: ${d.reason}`);
    case 'refuse':
      return new PairDiskError('EREFUSED', `refusing to pair: ${d.reason}`);
    default:
      return null;
  }
}

/** Marks the target of a copy inconsistent before the first byte is copied into it. */
export async function markTarget(core: PairCore, target: PairDisk): Promise<void> {
  if (target.meta) await saveDisk(core, target, { ...target.meta, consistent: false, updated: new Date().toISOString() });
}

/** Both disks in step: one generation (kept when the source had one, new otherwise). `p` is
 *  the disk of the side that serves from here on, `s` the other's: after a failover's
 *  re-protection the survivor's (secondary.qcow2) is `p`, and the records say so. */
export async function markInStep(core: PairCore, p: PairDisk, s: PairDisk, source: PairSideName): Promise<string | null> {
  if (!p.kept || !s.kept) return null;
  const size = (p.meta ?? s.meta)?.size ?? 0;
  const src = source === 'primary' ? p : s;
  const dst = source === 'primary' ? s : p;
  const srcMeta = src.meta ?? justCreated(DISK_FILE[src.name], size, src.name);
  const dstMeta = dst.meta ?? justCreated(DISK_FILE[dst.name], size, dst.name);
  const current = srcMeta.current === JUST_CREATED ? newId() : srcMeta.current;
  const [a, b] = inStep(srcMeta, dstMeta, current);
  // the target first: a crash between the two writes leaves both at `current` (same
  // generation, the source still primary) or the old records (the same decision again)
  const role = (d: PairDisk): DiskRole => (d === p ? 'primary' : 'secondary');
  await saveDisk(core, dst, { ...b, role: role(dst), checkpoint: core.metrics.checkpoints });
  await saveDisk(core, src, { ...a, role: role(src), checkpoint: core.metrics.checkpoints });
  return current;
}

/** A disk that goes on alone from here (failover survivor, primary without secondary).
 *  `unfencedPeer`: the peer's generation, when the peer could not be fenced and may go on too.
 *  `peerNotOutdated`: the peer's generation, noted in the same write before the peer is
 *  marked outdated (outdatePeer), so that no crash leaves the peer looking current unnoted. */
export async function goOnAlone(core: PairCore, d: PairDisk, role: DiskRole, unfencedPeer?: string, peerNotOutdated?: string): Promise<void> {
  if (!d.meta) return;
  await saveDisk(core, d, {
    ...startGeneration(d.meta, newId(), role),
    checkpoint: core.metrics.checkpoints,
    ...(unfencedPeer ? { unfencedPeer } : {}),
    ...(peerNotOutdated ? { peerNotOutdated } : {}),
  });
}

/** The secondary confirmed a checkpoint: its record says up to date at its generation. */
export async function markUpToDate(core: PairCore, d: PairDisk | null): Promise<void> {
  if (d?.meta && d.kept) await saveDisk(core, d, confirmedUpToDate(d.meta, core.metrics.checkpoints));
}

/**
 * DRBD's outdate-peer: the primary `alone` went on without its peer; writes the peer's record
 * Outdated (through the peer's daemon, `timeoutMs` per call), then drops the note from the
 * primary's record. True when the peer is marked (or needs no mark: it left the generation
 * noted, so the compare decides); false when it cannot be reached (the note stays).
 */
export async function outdatePeer(core: PairCore, alone: PairDisk, peer: Side, peerDisk: string, timeoutMs: number): Promise<boolean> {
  const left = alone.meta?.peerNotOutdated;
  if (!alone.meta || left === undefined) return true;
  const call: Call = (s, c, a) => core.call(s, c, a, timeoutMs);
  try {
    const m = await readMeta(peer, peerDisk, call);
    const marked = m ? outdateBy(m, left, alone.meta.current) : null;
    if (marked) await writeMeta(peer, marked, call);
    core.log('warn', marked ? `marked the ${peer.name}'s disk outdated (generation ${left}; the primary went on as ${alone.meta.current})` : `the ${peer.name}'s disk is no longer at generation ${left}: not marked outdated, the generations decide`);
  } catch (e) {
    core.log('warn', `cannot mark the ${peer.name}'s disk outdated (it stays noted in the primary's record): ${e instanceof Error ? e.message : String(e)}`);
    return false;
  }
  const { peerNotOutdated: _p, ...rest } = alone.meta;
  await saveDisk(core, alone, { ...rest, updated: new Date().toISOString() });
  return true;
}
