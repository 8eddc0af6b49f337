// Split brain: both disks changed since the generation they last shared, so neither is the
// newer one and copying either way would destroy writes someone was told are done. The pair
// then copies nothing, serves nothing, reports what each side changed (its change record) and
// waits for the operator's `lockstep pair resolve --keep SIDE`, which first saves the other
// side's whole disk as it was (a qcow2 beside that disk, fsync'd, plus a JSON description),
// then resyncs exactly the union of the two records from the kept side.
//
// Two ways in: the generations say so (both went on alone from one generation: equal bitmap
// ids, or histories that meet), or a failover could not fence the old primary (no lease, its
// host unreachable: the survivor's record says `unfencedPeer`) and the old primary's record is
// not empty: whatever it wrote after the last confirmed checkpoint may have been acknowledged
// to its clients after the survivor took over, so it is a history too, not a rollback.

import { join } from 'node:path';
import { writeFileDurably } from './meta-store.js';
import { ensureImage, imagePath, LOG_NODE } from './setup.js';
import { resync, unionExtents, type ByteRange } from './sync.js';
import type { DiskMeta, PairSideName, SyncDecision } from './generations.js';
import type { PairCore } from './core.js';
import type { Side, SideName } from './sides.js';
import type { PairOptions } from './options.js';

export const otherSide = (s: PairSideName): PairSideName => (s === 'primary' ? 'secondary' : 'primary');

/** Each side's change record: what it wrote since the common generation (a superset). */
export interface SideRecords {
  primary: { extents: ByteRange[]; bytes: number };
  secondary: { extents: ByteRange[]; bytes: number };
}

/**
 * The start's decision once the change records are known: an incremental copy whose source
 * survived an unfenced failover becomes split brain when the other side changed anything.
 */
export function checkUnfenced(decision: SyncDecision, p: DiskMeta | null, s: DiskMeta | null, records: SideRecords): SyncDecision {
  if (decision.kind !== 'incremental' || !p || !s) return decision;
  const src = decision.source === 'primary' ? p : s;
  const dst = decision.source === 'primary' ? s : p;
  const other = otherSide(decision.source);
  if (src.unfencedPeer === undefined || src.unfencedPeer !== dst.current) return decision;
  if (records[other].bytes === 0) return decision;
  return {
    kind: 'split-brain',
    reason:
      `the ${decision.source} disk took over from generation ${dst.current} without fencing the ${other} (no lease, or its host unreachable), ` +
      `and the ${other} disk changed ${records[other].bytes} bytes since: it may have acknowledged them to its clients`,
  };
}

/** What a pair in split brain reports, and what `resolve` copies. */
export interface SplitBrain {
  reason: string;
  /** bytes each side changed since the common generation (its change record) */
  'changed-bytes': { primary: number; secondary: number };
  /** the union of the two records: what differs at most, what a resolve copies */
  'diverged-bytes': number;
  extents: ByteRange[];
  /** the commands that settle it */
  commands: string[];
}

export function splitBrainInfo(reason: string, records: SideRecords, control: string): SplitBrain {
  const extents = unionExtents(records.primary.extents, records.secondary.extents);
  const ctl = `--control ${control}`;
  return {
    reason,
    'changed-bytes': { primary: records.primary.bytes, secondary: records.secondary.bytes },
    'diverged-bytes': extents.reduce((a, r) => a + r.length, 0),
    extents,
    commands: [
      `lockstep pair resolve --keep primary ${ctl}    # keep the primary's disk; the secondary's is saved, then overwritten where they differ`,
      `lockstep pair resolve --keep secondary ${ctl}  # keep the secondary's disk; the primary's is saved, then overwritten where they differ`,
    ],
  };
}

/** What entering stage split-brain reads and sets on the supervisor. */
export interface SplitBrainHost extends PairCore {
  readonly opts: Pick<PairOptions, 'control' | 'dataDir' | 'log'>;
  splitBrain: SplitBrain | null;
}

/** Stage split-brain: nothing copied, the operator told what to run. Nothing served at
 *  start; found when the failed side came back, the survivor (`serving`) serves on. */
export function enterSplitBrain(sup: SplitBrainHost, reason: string, records: SideRecords, serving?: SideName): void {
  const sb = (sup.splitBrain = splitBrainInfo(reason, records, sup.opts.control ?? join(sup.opts.dataDir, 'pair.sock')));
  sup.stages.to('split-brain');
  const what = serving
    ? `Neither disk was changed; the ${serving} daemon serves on (its clients keep their connections), the ${otherSide(serving)} disk serves no writes.`
    : 'Neither disk was changed and nothing is served.';
  sup.lastError = `split brain: ${reason}. ${what} Keep one with \`lockstep pair resolve --keep primary|secondary\` (the other disk is saved first)`;
  sup.opts.log('error', sup.lastError, { 'changed-bytes': sb['changed-bytes'], 'diverged-bytes': sb['diverged-bytes'], run: sb.commands.map((c) => c.replace(/\s+#.*$/, '')) });
}

/** `lockstep pair resolve` exit codes (docs/replication.md). */
export const RESOLVE_EXIT = { done: 0, error: 1, 'nothing-to-resolve': 2, refused: 3, 'not-running': 4 } as const;

export class ResolveError extends Error {
  constructor(
    /** ENOSPLIT: nothing to resolve; EREFUSED: this resolve cannot run; EINVAL: a bad request */
    readonly code: 'ENOSPLIT' | 'EREFUSED' | 'EINVAL',
    message: string,
  ) {
    super(message);
  }
}

/** Where the discarded side's disk was saved. */
export interface SavedDisk {
  side: PairSideName;
  /** on that side's host: the whole disk as it was (sparse qcow2, no backing file) */
  image: string;
  /** beside it: the generations, both records and the diverged regions */
  description: string;
  /** bytes the save job wrote as data (zero regions stay unallocated) */
  'data-bytes': number;
}

/** A name safe in a file name, sortable: 20261205T074512Z. */
export function stampOf(d: Date): string {
  return d.toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z');
}

const SAVE_NODE = 'split-brain-save';

/**
 * Copies `side`'s whole disk, as it is now, into a new qcow2 beside it on its own host:
 * DIR/split-brain-SIDE-STAMP.qcow2. The copy reads through the side's dirty-log node (reads
 * are not recorded) and skips zeroes (a new image reads zeroes already), so it costs the
 * disk's data, not its size. The job flushes its target when it completes; the description
 * written after it (crash-safely: temp file, fsync, rename, directory fsync) makes the new
 * directory entries durable too, before the caller overwrites anything.
 */
export async function saveDisk(core: PairCore, side: Side, name: PairSideName, size: number, meta: { primary: DiskMeta | null; secondary: DiskMeta | null }, sb: SplitBrain, now = new Date()): Promise<SavedDisk> {
  const base = `split-brain-${name}-${stampOf(now)}`;
  const image = imagePath(side.layout, `${base}.qcow2`);
  const description = imagePath(side.layout, `${base}.json`);
  await ensureImage(side.qmp, side.layout, `${base}.qcow2`, size, false);
  await core.call(side, 'blockdev-add', { 'node-name': SAVE_NODE, driver: 'qcow2', file: { driver: 'file', filename: image } });
  let dataBytes = 0;
  try {
    const r = await resync(side.qmp, core.log, undefined, LOG_NODE[name], SAVE_NODE, [{ offset: 0, length: size }], true, 'split-brain save');
    dataBytes = r.dataBytes;
  } finally {
    await core.call(side, 'blockdev-del', { 'node-name': SAVE_NODE }).catch(() => {});
  }
  const data = {
    format: 'lockstep-split-brain-save',
    version: 1,
    saved: now.toISOString(),
    side: name,
    image,
    size,
    reason: sb.reason,
    generations: meta,
    'changed-bytes': sb['changed-bytes'],
    'diverged-extents': sb.extents,
  };
  if (side.layout.local) writeFileDurably(description, JSON.stringify(data, null, 1) + '\n');
  else await core.call(side, 'x-meta-write', { filename: description, data });
  return { side: name, image, description, 'data-bytes': dataBytes };
}
