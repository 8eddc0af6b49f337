// `lockstep pair resolve --keep SIDE`: ends a split brain (split-brain.ts). The other side's
// whole disk is saved first; then, found at start (nothing served), the union of both change
// records is copied from the kept side and the pair is protected as a start does; found while
// a failover's survivor served, either the survivor's disk is kept (the other returns as its
// secondary through the live resync, bring-back.ts) or the other one is (the survivor stops
// serving and the pair is set up again as at start).

import type { PairSideName } from './generations.js';
import type { PairDisk } from './disks.js';
import type { Side, SideName } from './sides.js';
import type { ResyncResult } from './sync.js';
import type { LiveResyncResult } from './reprotect.js';
import type { ReturnState } from './bring-back.js';
import { ResolveError, otherSide, saveDisk as saveSplitDisk, type SavedDisk, type SplitBrain } from './split-brain.js';
import { resetDaemon } from './returning.js';
import { protect, setUp, type StartHost } from './start.js';

/** What a resolve did: the side kept, where the other disk was saved, what was copied. */
export interface Resolved {
  kept: PairSideName;
  saved: SavedDisk;
  copied: ResyncResult | null;
}

/** What a resolve reads and sets on the supervisor. */
export interface ResolveHost extends StartHost {
  serving: string[];
  lastResolve: Resolved | null;
  /** a resolve runs (a second one is refused) */
  resolving: boolean;
  readonly returns: Pick<ReturnState, 'resolvedKeep'>;
  readonly lastReprotect: LiveResyncResult | null;
  /** the side whose daemon was started as `name` */
  sideNamed(name: SideName): Side | null;
  stopTimers(): void;
  reprotect(): Promise<void>;
}

/**
 * Ends a split brain: saves the other side's whole disk as it is (split-brain.ts), then
 * copies the union of the two change records from the kept side onto it and protects the
 * pair as a start would. Resolves with what was saved and copied.
 */
export async function runResolve(sup: ResolveHost, keepText: string): Promise<Resolved> {
  if (keepText !== 'primary' && keepText !== 'secondary') throw new ResolveError('EINVAL', `--keep: expected primary or secondary, got '${keepText}'`);
  const keep: PairSideName = keepText;
  if (sup.resolving) throw new ResolveError('EREFUSED', 'a resolve is already running');
  const sb = sup.splitBrain;
  if (sup.stages.stage !== 'split-brain' || !sb) throw new ResolveError('ENOSPLIT', `nothing to resolve: the pair is ${sup.stages.stage}, not in split brain`);
  const drop = otherSide(keep);
  const kd = sup.disks[keep];
  const dd = sup.disks[drop];
  if (!kd?.meta || !dd?.meta) throw new ResolveError('EREFUSED', 'a disk has no generation record');
  if (!kd.meta.consistent) throw new ResolveError('EREFUSED', `the ${keep} disk is inconsistent (a resync into it or a failover commit did not finish): it cannot be kept`);
  for (const d of [kd, dd]) if (!d.side.alive) throw new ResolveError('EREFUSED', `the ${d.name} daemon is not running: start the pair again`);
  // found when the failed side came back: the survivor serves (see enterSplitBrain)
  const survivor = sup.serving.length > 0 ? sup.primary : null;
  sup.resolving = true;
  try {
    if (survivor) return (sup.lastResolve = keep === survivor.name ? await resolveServing(sup, keep, dd, sb) : await resolveAfresh(sup, keep, survivor));
    return await resolveAtStart(sup, keep, dd, sb);
  } finally {
    sup.resolving = false;
  }
}

/** A split brain with nothing served: the other disk saved, then the union of both records
 *  copied from the kept one, and the pair protected as a start does. */
async function resolveAtStart(sup: ResolveHost, keep: PairSideName, dd: PairDisk, sb: SplitBrain): Promise<Resolved> {
  const drop = dd.name;
  const o = sup.opts;
  o.log('warn', `resolving the split brain: keeping the ${keep} disk; saving the ${drop} disk first`);
  const saved = await saveSplitDisk(sup, dd.side, drop, o.size, { primary: sup.disks.primary?.meta ?? null, secondary: sup.disks.secondary?.meta ?? null }, sb);
  o.log('info', `saved the ${drop} disk as it was`, { image: saved.image, description: saved.description, data: saved['data-bytes'] });
  const reason = `split brain resolved: the ${keep} disk kept, the ${drop} disk saved in ${saved.image}`;
  sup.lastSync = { kind: 'incremental', source: keep, reason };
  sup.lastError = undefined;
  // from here the copy's progress is what the status shows (a failed copy leaves the target
  // inconsistent: the next start refuses it as a source, see docs/replication.md)
  sup.splitBrain = null;
  await protect(sup, { kind: 'incremental', source: keep, reason }, { primary: { extents: sb.extents, bytes: sb['diverged-bytes'] }, secondary: { extents: [], bytes: 0 } });
  sup.lastResolve = { kept: keep, saved, copied: sup.lastResync };
  return sup.lastResolve;
}

/**
 * A split brain found while the survivor serves, resolved keeping the other disk: the
 * survivor stops serving (its clients are cut off; their history is the one the operator
 * discards, saved whole below before anything is copied), both daemons' graphs are taken
 * down and set up as at start, which finds the split brain again with nothing served, and
 * the resolve goes on as at start.
 */
async function resolveAfresh(sup: ResolveHost, keep: PairSideName, survivor: Side): Promise<Resolved> {
  const o = sup.opts;
  o.log('warn', `resolving the split brain: keeping the ${keep} disk; the ${survivor.name} daemon stops serving (its clients are cut off) and the pair is set up again as at start`);
  sup.stopTimers();
  sup.lease?.stop();
  sup.lease = null;
  await sup.outputCommit.disable(survivor).catch(() => {});
  const p = sup.sideNamed('primary');
  const s = sup.sideNamed('secondary');
  if (!p?.alive || !s?.alive) throw new ResolveError('EREFUSED', 'a daemon is not running: start the pair again');
  for (const side of [survivor, survivor === p ? s : p]) await resetDaemon(sup, side);
  sup.serving = [];
  sup.splitBrain = null;
  sup.primary = p;
  sup.secondary = s;
  await setUp(sup, p, s);
  const sb = sup.splitBrain as SplitBrain | null;
  if (sup.stages.stage !== 'split-brain' || !sb) throw new Error(`set up again, the disks compared as ${sup.lastSync?.kind ?? 'unknown'} (${sup.lastSync?.reason ?? ''}): the pair went on as a start does`);
  return resolveAtStart(sup, keep, sup.disks[otherSide(keep)]!, sb);
}

/**
 * A split brain found while the survivor serves, resolved keeping the survivor's disk: the
 * other disk is saved on its host, its daemon's graph taken down, and it returns as the
 * survivor's secondary through the live resync (the union of both records, copied while
 * the survivor serves on), exactly as a lost secondary does.
 */
async function resolveServing(sup: ResolveHost, keep: PairSideName, dd: PairDisk, sb: SplitBrain): Promise<Resolved> {
  const o = sup.opts;
  const drop = dd.name;
  o.log('warn', `resolving the split brain: keeping the ${keep} disk, which serves; saving the ${drop} disk first`);
  const saved = await saveSplitDisk(sup, dd.side, drop, o.size, { primary: sup.disks.primary?.meta ?? null, secondary: sup.disks.secondary?.meta ?? null }, sb);
  o.log('info', `saved the ${drop} disk as it was`, { image: saved.image, description: saved.description, data: saved['data-bytes'] });
  const at = { primary: sup.disks.primary?.meta?.current ?? '', secondary: sup.disks.secondary?.meta?.current ?? '' };
  sup.returns.resolvedKeep = { keep, at };
  sup.lastSync = { kind: 'incremental', source: keep, reason: `split brain resolved: the ${keep} disk kept, the ${drop} disk saved in ${saved.image}` };
  sup.lastError = undefined;
  sup.splitBrain = null;
  await resetDaemon(sup, dd.side);
  sup.stages.to('degraded');
  await sup.reprotect();
  const r = sup.lastReprotect!;
  const sum = (k: 'bytes' | 'dataBytes' | 'zeroedBytes' | 'skippedZeroBytes') => r.passes.reduce((a, x) => a + x[k], 0);
  return { kept: keep, saved, copied: { extents: r.union, bytes: sum('bytes'), dataBytes: sum('dataBytes'), zeroedBytes: sum('zeroedBytes'), skippedZeroBytes: sum('skippedZeroBytes') } };
}
