// Data generations of a pair's disks, in the manner of DRBD's UUIDs (lifecycle-notes.md): each
// disk carries a current id, a bitmap id (the generation since which it counts its changes
// against its peer), a history of older ids, whether it is consistent, its last role and its
// last confirmed checkpoint. Comparing the two tuples at every start decides, before anything
// is copied: no copy, an incremental resync from the newer side, a full sync from the newer
// side, split brain (both changed since they diverged) or unrelated disks. A disk without
// metadata is never guessed newer.
//
// This module is pure (ids come from the caller's random source); meta-store.ts persists it.

import { randomBytes } from 'node:crypto';

/** The current id of a disk that was created empty and never written through a pair. */
export const JUST_CREATED = 'just-created';
export const META_FORMAT = 'lockstep-pair-meta';
export const HISTORY_LENGTH = 32;

export type DiskRole = 'primary' | 'secondary';
/** The two disks of a pair, named by the side whose daemon holds them at start. */
export type PairSideName = 'primary' | 'secondary';

export interface DiskMeta {
  format: typeof META_FORMAT;
  version: 1;
  /** the image file this describes (beside it) */
  disk: string;
  /** virtual size in bytes */
  size: number;
  current: string;
  /** the generation since which this disk counts changes against its peer; null when in step */
  bitmap: string | null;
  /** older ids, newest first, at most HISTORY_LENGTH */
  history: string[];
  /** false while the disk is a resync target (or its failover commit runs): never a source */
  consistent: boolean;
  role: DiskRole;
  /** the last checkpoint the secondary confirmed while this disk was in the pair (0: none) */
  checkpoint: number;
  /** when this record was written (ISO time), for people */
  updated: string;
  /** a failover made this disk the survivor without fencing the old primary (no lease, its
   *  host unreachable): the generation that primary was at, which it may have gone on writing
   *  under. A later compare that finds the peer changed since then calls it split brain. */
  unfencedPeer?: string;
  /** a live resync onto this disk (it is inconsistent meanwhile): its session, the source's
   *  generation, the pass and the offset below which that pass's bytes are copied and
   *  flushed here; a later attempt of the same session resumes above it */
  resync?: ResyncMark;
  /** DRBD's UpToDate: the generation at which this disk was last a connected, up-to-date member
   *  of the pair (rewritten on the secondary at each confirmed checkpoint, with `checkpoint`).
   *  A takeover and a promotion score need it equal to `current`. */
  upToDate?: string;
  /** DRBD's Outdated: the peer went on alone from this disk's generation, to the generation
   *  named here; this disk must not serve or be promoted until it is resynced */
  outdated?: string;
  /** on a disk gone on alone: the peer's generation, which could not be marked outdated (the
   *  peer unreachable); until it is, the cluster must keep the peer from promotion */
  peerNotOutdated?: string;
}

export interface ResyncMark {
  session: string;
  source: string;
  pass: number;
  'done-up-to': number;
}

export function newId(random: () => Buffer = () => randomBytes(8)): string {
  return random().toString('hex');
}

/** The metadata of a disk created empty just now. */
export function justCreated(disk: string, size: number, role: DiskRole, now = new Date()): DiskMeta {
  return { format: META_FORMAT, version: 1, disk, size, current: JUST_CREATED, bitmap: null, history: [], consistent: true, role, checkpoint: 0, updated: now.toISOString() };
}

function pushHistory(history: readonly string[], id: string): string[] {
  if (id === JUST_CREATED) return [...history];
  return [id, ...history.filter((h) => h !== id)].slice(0, HISTORY_LENGTH);
}

/** A new generation on a disk that goes on alone (failover survivor, a primary that lost its
 *  secondary): the old current becomes the bitmap id (its changes are counted from there)
 *  and enters the history. */
export function startGeneration(m: DiskMeta, id: string, role: DiskRole, now = new Date()): DiskMeta {
  const { outdated: _o, ...rest } = m;
  return { ...rest, upToDate: id, current: id, bitmap: m.bitmap ?? (m.current === JUST_CREATED ? null : m.current), history: pushHistory(m.history, m.current), role, consistent: true, updated: now.toISOString() };
}

/** Both disks in step (after a sync, or two just-created disks paired): one shared generation,
 *  no bitmap, the histories merged. */
export function inStep(source: DiskMeta, target: DiskMeta, current: string, now = new Date()): [DiskMeta, DiskMeta] {
  const merged = [...pushHistory(source.history, source.current), ...target.history, target.current].filter((h, i, a) => h !== current && h !== JUST_CREATED && a.indexOf(h) === i).slice(0, HISTORY_LENGTH);
  const updated = now.toISOString();
  // in step again: nothing either side wrote unfenced is left to tell apart, and a finished
  // resync leaves no mark
  const { unfencedPeer: _s, resync: _sr, outdated: _so, peerNotOutdated: _sp, ...src } = source;
  const { unfencedPeer: _t, resync: _tr, outdated: _to, peerNotOutdated: _tp, ...dst } = target;
  return [
    { ...src, current, bitmap: null, history: merged, consistent: true, upToDate: current, updated },
    { ...dst, current, bitmap: null, history: merged, consistent: true, upToDate: current, updated },
  ];
}

export type SyncDecision =
  | { kind: 'none'; reason: string }
  | { kind: 'incremental'; source: PairSideName; reason: string }
  | { kind: 'full'; source: PairSideName; targetIsZero: boolean; reason: string }
  | { kind: 'split-brain'; reason: string }
  | { kind: 'unrelated'; reason: string }
  | { kind: 'no-metadata'; sides: PairSideName[]; reason: string }
  | { kind: 'refuse'; reason: string };

const other = (s: PairSideName): PairSideName => (s === 'primary' ? 'secondary' : 'primary');

/**
 * DRBD's ordered comparison (drbd_uuid_compare as described in lifecycle-notes.md), then the
 * consistency rule: an inconsistent disk (an interrupted resync target) is never a source.
 */
export function compareGenerations(p: DiskMeta | null, s: DiskMeta | null): SyncDecision {
  const missing = (['primary', 'secondary'] as const).filter((n) => (n === 'primary' ? p : s) === null);
  if (missing.length > 0 || !p || !s) {
    return { kind: 'no-metadata', sides: missing, reason: `no generation metadata on the ${missing.join(' and the ')} disk: lockstep never guesses which disk is newer` };
  }
  if (p.size !== s.size) return { kind: 'refuse', reason: `the disks differ in size (primary ${p.size}, secondary ${s.size} bytes)` };
  const byName = { primary: p, secondary: s };
  const decided = rawCompare(p, s);
  if (decided.kind === 'incremental' || decided.kind === 'full') {
    const src = byName[decided.source];
    if (!src.consistent) {
      return { kind: 'refuse', reason: `the newer disk (${decided.source}) is inconsistent: ${decided.reason}, but its last resync or failover commit did not finish` };
    }
    if (src.outdated !== undefined) {
      return { kind: 'refuse', reason: `the disk found newer (${decided.source}) is marked outdated by generation ${src.outdated}: ${decided.reason}` };
    }
  }
  return decided;
}

function rawCompare(p: DiskMeta, s: DiskMeta): SyncDecision {
  const pj = p.current === JUST_CREATED;
  const sj = s.current === JUST_CREATED;
  // 1-3: just-created disks
  if (pj && sj) return { kind: 'none', reason: 'both disks are just created (empty)' };
  if (pj) return { kind: 'full', source: 'secondary', targetIsZero: true, reason: 'the primary disk is just created' };
  if (sj) return { kind: 'full', source: 'primary', targetIsZero: true, reason: 'the secondary disk is just created' };
  // 4: the same generation: in step up to what the last start or checkpoint left unconfirmed
  if (p.current === s.current) {
    if (p.consistent && s.consistent) {
      // the side that was primary may have written after the last confirmed checkpoint
      const src: PairSideName = s.role === 'primary' && p.role !== 'primary' ? 'secondary' : 'primary';
      return { kind: 'incremental', source: src, reason: `both disks are at generation ${p.current}; the ${src} disk may hold writes after the last confirmed checkpoint` };
    }
    if (p.consistent !== s.consistent) {
      const src: PairSideName = p.consistent ? 'primary' : 'secondary';
      return { kind: 'incremental', source: src, reason: `both disks are at generation ${p.current}; the ${other(src)} disk is an unfinished resync target` };
    }
    return { kind: 'refuse', reason: `both disks are at generation ${p.current} and neither is consistent` };
  }
  // 5/7: one side's current is the other's bitmap: the other changed since, incremental
  if (s.bitmap !== null && p.current === s.bitmap) return { kind: 'incremental', source: 'secondary', reason: `the secondary disk went on from the primary's generation ${p.current}` };
  if (p.bitmap !== null && s.current === p.bitmap) return { kind: 'incremental', source: 'primary', reason: `the primary disk went on from the secondary's generation ${s.current}` };
  // 6/8: one side's current is in the other's history: related only through history, full
  if (s.history.includes(p.current)) return { kind: 'full', source: 'secondary', targetIsZero: false, reason: `the primary's generation ${p.current} is in the secondary's history` };
  if (p.history.includes(s.current)) return { kind: 'full', source: 'primary', targetIsZero: false, reason: `the secondary's generation ${s.current} is in the primary's history` };
  // 9/10: both changed since a common point
  if (p.bitmap !== null && p.bitmap === s.bitmap) return { kind: 'split-brain', reason: `both disks changed since generation ${p.bitmap} (primary now ${p.current}, secondary now ${s.current})` };
  const pAll = new Set([p.bitmap, ...p.history].filter((x): x is string => x !== null));
  const common = [s.bitmap, ...s.history].find((x) => x !== null && pAll.has(x));
  if (common) return { kind: 'split-brain', reason: `both disks changed since they shared generation ${common}` };
  return { kind: 'unrelated', reason: `the disks share no generation (primary ${p.current}, secondary ${s.current}): they hold unrelated data` };
}

/** The secondary confirmed a checkpoint: up to date at its generation (DRBD's UpToDate). */
export function confirmedUpToDate(m: DiskMeta, checkpoint: number, now = new Date()): DiskMeta {
  return { ...m, upToDate: m.current, checkpoint, updated: now.toISOString() };
}

/** The peer went on alone to generation `by` from this disk's generation: Outdated. Null when
 *  this disk is not at the generation the peer left (it went on too, or was resynced): then
 *  the generations' compare decides, and nothing is marked on a guess. */
export function outdateBy(m: DiskMeta, left: string, by: string, now = new Date()): DiskMeta | null {
  if (m.current !== left || m.current === by) return null;
  return { ...m, outdated: by, updated: now.toISOString() };
}

/** Why this disk may not be taken over or promoted as the pair's last secondary, or null. */
export function notCurrentReason(m: DiskMeta): string | null {
  if (!m.consistent) return 'says the disk is not consistent (a resync into it or a failover commit did not finish)';
  if (m.outdated !== undefined) return `says the disk is outdated: the primary went on alone (generation ${m.outdated}) after this disk's generation ${m.current}; it must be resynced from that primary first`;
  if (m.upToDate !== m.current) return `does not say the disk was an up-to-date secondary at its generation ${m.current} (no confirmed checkpoint recorded at it): lockstep never guesses that a disk is current`;
  return null;
}

/** Checks a stored record's shape; a malformed one is an error naming the file. */
export function parseMeta(value: unknown, where: string): DiskMeta | null {
  if (value === null || value === undefined) return null;
  const m = value as Partial<DiskMeta>;
  const ok =
    typeof m === 'object' &&
    m.format === META_FORMAT &&
    m.version === 1 &&
    typeof m.disk === 'string' &&
    typeof m.size === 'number' &&
    typeof m.current === 'string' &&
    (m.bitmap === null || typeof m.bitmap === 'string') &&
    Array.isArray(m.history) &&
    m.history.every((h) => typeof h === 'string') &&
    typeof m.consistent === 'boolean' &&
    (m.role === 'primary' || m.role === 'secondary') &&
    typeof m.checkpoint === 'number' &&
    (m.unfencedPeer === undefined || typeof m.unfencedPeer === 'string') &&
    (m.upToDate === undefined || typeof m.upToDate === 'string') &&
    (m.outdated === undefined || typeof m.outdated === 'string') &&
    (m.peerNotOutdated === undefined || typeof m.peerNotOutdated === 'string') &&
    (m.resync === undefined ||
      (typeof m.resync === 'object' &&
        m.resync !== null &&
        typeof m.resync.session === 'string' &&
        typeof m.resync.source === 'string' &&
        Number.isSafeInteger(m.resync.pass) &&
        Number.isSafeInteger(m.resync['done-up-to'])));
  if (!ok) throw new Error(`${where}: not a lockstep pair metadata record (format ${META_FORMAT}, version 1)`);
  return m as DiskMeta;
}
