// qemu-img check for qcow2: walk every reference (header, L1/L2 tables and data of the
// active state and of internal snapshots, snapshot table, refcount table and blocks), count
// references per host cluster, and compare with the stored refcounts.
//   stored < references: corruption (a cluster could be handed out twice)
//   stored > references: leak (space lost, harmless)
// Also flags L1/L2 entries whose COPIED flag disagrees with the refcount (corruption, as
// QEMU counts it). Repair ('leaks' or 'all') rewrites refcounts (and COPIED flags for
// 'all'); nothing is written unless repair was asked.

import { InvalidArgumentError } from '../../../errors.js';
import { INCOMPAT_DIRTY, checkSupported, readHeader, type Qcow2Header } from './header.js';
import { FsHostFile, type HostFile } from './host-file.js';
import { Qcow2Image } from './image.js';
import { ClusterKind, compressedClusters, decodeL1, readCompressed, readL2, L2_COPIED_HI } from './l2-entry.js';

export interface Qcow2CheckResult {
  'check-errors': number;
  corruptions?: number;
  leaks?: number;
  'corruptions-fixed'?: number;
  'leaks-fixed'?: number;
  'image-end-offset'?: number;
  'total-clusters'?: number;
  'allocated-clusters'?: number;
  'fragmented-clusters'?: number;
  'compressed-clusters'?: number;
  filename: string;
  format: 'qcow2';
}

interface Counts {
  corruptions: number;
  leaks: number;
  checkErrors: number;
  allocated: number;
  fragmented: number;
  compressed: number;
  imageEnd: number;
  /** human-readable findings (QEMU prints these on stderr) */
  messages: string[];
}

/** Reference counts per host cluster: a dense array with a map for stray far offsets. */
class RefMap {
  private dense: Uint32Array;
  readonly sparse = new Map<number, number>();
  constructor(n: number) {
    this.dense = new Uint32Array(n);
  }
  inc(c: number): void {
    if (c < this.dense.length) this.dense[c]!++;
    else this.sparse.set(c, (this.sparse.get(c) ?? 0) + 1);
  }
  get(c: number): number {
    return c < this.dense.length ? this.dense[c]! : (this.sparse.get(c) ?? 0);
  }
  get denseLength(): number {
    return this.dense.length;
  }
}

interface CopiedFix {
  /** where the 8-byte entry lives in the file */
  at: number;
  set: boolean;
}

async function analyse(file: HostFile, h: Qcow2Header, img: Qcow2Image): Promise<{ counts: Counts; refs: RefMap; copiedFixes: CopiedFix[] }> {
  const cs = img.clusterSize;
  const fileLen = file.length();
  const fileClusters = Math.ceil(fileLen / cs);
  const rc = img.refcounts;
  const refs = new RefMap(Math.max(fileClusters, 1) + 1);
  const counts: Counts = { corruptions: 0, leaks: 0, checkErrors: 0, allocated: 0, fragmented: 0, compressed: 0, imageEnd: 0, messages: [] };
  const copiedChecks: Array<{ at: number; cluster: number; copied: boolean; what: string }> = [];
  const addRange = (off: number, len: number): void => {
    const first = Math.floor(off / cs);
    const last = Math.floor((off + len - 1) / cs);
    for (let c = first; c <= last; c++) refs.inc(c);
  };

  addRange(0, cs); // header
  const l2Seen = new Set<number>();

  async function walkL1(l1Offset: number, l1Size: number, active: boolean): Promise<void> {
    if (l1Size === 0) return;
    addRange(l1Offset, l1Size * 8);
    if (l1Offset % cs !== 0 || l1Offset + l1Size * 8 > fileLen) {
      counts.corruptions++;
      counts.messages.push(`ERROR L1 table at 0x${l1Offset.toString(16)} is misaligned or past the end of the file`);
      return;
    }
    const l1 = await file.read(l1Offset, l1Size * 8);
    for (let i = 0; i < l1Size; i++) {
      const e = decodeL1(l1.readUInt32BE(i * 8), l1.readUInt32BE(i * 8 + 4));
      if (e.offset === 0) continue;
      refs.inc(Math.floor(e.offset / cs));
      if (active) copiedChecks.push({ at: l1Offset + i * 8, cluster: Math.floor(e.offset / cs), copied: e.copied, what: `L1 entry ${i}` });
      if (e.offset % cs !== 0 || e.offset + cs > fileLen) {
        counts.corruptions++;
        counts.messages.push(`ERROR l2_offset=${e.offset.toString(16)}: Table is not cluster aligned or past the end of the file; L1 entry corrupted`);
        continue;
      }
      const t = await file.read(e.offset, cs);
      const firstVisit = !l2Seen.has(e.offset);
      let nextContiguous = 0; // QEMU counts fragmentation within each L2 table
      l2Seen.add(e.offset);
      for (let j = 0; j < img.l2Entries; j++) {
        const x = readL2(t, j, img.v3);
        switch (x.kind) {
          case ClusterKind.Compressed: {
            const c = readCompressed(t, j, img.clusterBits);
            const r = compressedClusters(c, cs);
            for (let k = 0; k < r.count; k++) refs.inc(r.first + k);
            if (active) {
              counts.allocated++;
              counts.compressed++;
              counts.fragmented++;
            }
            if (t.readUInt32BE(j * 8) & L2_COPIED_HI) {
              counts.corruptions++;
              counts.messages.push(`ERROR: compressed cluster ${j} of L2 table 0x${e.offset.toString(16)} has the COPIED flag set`);
            }
            break;
          }
          case ClusterKind.Normal:
          case ClusterKind.Zero: {
            if (x.offset === 0) break;
            if (x.offset % cs !== 0) {
              counts.corruptions++;
              counts.messages.push(`ERROR offset=${x.offset.toString(16)}: Cluster is not properly aligned; L2 entry corrupted`);
              break;
            }
            refs.inc(x.offset / cs);
            if (active) {
              counts.allocated++;
              if (nextContiguous !== 0 && x.offset !== nextContiguous) counts.fragmented++;
              nextContiguous = x.offset + cs;
              if (firstVisit) copiedChecks.push({ at: e.offset + j * 8, cluster: x.offset / cs, copied: x.copied, what: `L2 entry ${j} of table 0x${e.offset.toString(16)}` });
            }
            break;
          }
          default:
            break;
        }
      }
    }
  }

  await walkL1(h.l1TableOffset, h.l1Size, true);

  // internal snapshots: the table and each snapshot's L1 tree
  if (h.nbSnapshots > 0) {
    let off = h.snapshotsOffset;
    const start = off;
    for (let s = 0; s < h.nbSnapshots; s++) {
      const fixed = await file.read(off, 40);
      const l1Off = Number(fixed.readBigUInt64BE(0));
      const l1Size = fixed.readUInt32BE(8);
      const idLen = fixed.readUInt16BE(12);
      const nameLen = fixed.readUInt16BE(14);
      const extra = fixed.readUInt32BE(36);
      off += (40 + extra + idLen + nameLen + 7) & ~7;
      await walkL1(l1Off, l1Size, false);
    }
    addRange(start, off - start);
  }

  // refcount metadata
  addRange(rc.tableOffset, rc.tableClusters * cs);
  for (let i = 0; i < rc.table.length; i++) {
    const b = rc.table[i]!;
    if (b !== 0) refs.inc(b / cs);
  }

  // compare stored refcounts with references
  const limit = Math.max(refs.denseLength, fileClusters);
  let highest = -1;
  const stored = async (c: number): Promise<number> => rc.get(c);
  const clusters: Iterable<number> = (function* () {
    for (let c = 0; c < limit; c++) yield c;
    for (const k of [...refs.sparse.keys()].sort((a, b) => a - b)) if (k >= limit) yield k;
  })();
  for (const c of clusters) {
    const want = refs.get(c);
    const have = await stored(c);
    if (want > 0 || have > 0) highest = c;
    if (have < want) {
      counts.corruptions++;
      counts.messages.push(`ERROR cluster ${c} refcount=${have} reference=${want}`);
    } else if (have > want) {
      counts.leaks++;
      counts.messages.push(`Leaked cluster ${c} refcount=${have} reference=${want}`);
    }
  }
  // clusters with a stored refcount beyond everything referenced and the file end
  for (let i = 0; i < rc.table.length; i++) {
    const b = rc.table[i]!;
    if (b === 0) continue;
    const base = i * rc.blockEntries;
    if (base + rc.blockEntries <= limit) continue;
    for (let c = Math.max(base, limit); c < base + rc.blockEntries; c++) {
      const have = await stored(c);
      if (have > 0) {
        highest = Math.max(highest, c);
        counts.leaks++;
        counts.messages.push(`Leaked cluster ${c} refcount=${have} reference=0`);
      }
    }
  }
  counts.imageEnd = (highest + 1) * cs;

  // COPIED flags must say "refcount is exactly one"
  const copiedFixes: CopiedFix[] = [];
  for (const chk of copiedChecks) {
    const have = await stored(chk.cluster);
    const want = refs.get(chk.cluster);
    if ((have === 1) !== chk.copied) {
      counts.corruptions++;
      counts.messages.push(`ERROR OFLAG_COPIED ${chk.what}: refcount=${have}`);
    }
    // after a refcount repair the stored refcount is the reference count
    if ((want === 1) !== chk.copied) copiedFixes.push({ at: chk.at, set: want === 1 });
  }
  return { counts, refs, copiedFixes };
}

function toResult(filename: string, h: Qcow2Header, c: Counts): Qcow2CheckResult {
  const r: Qcow2CheckResult = { 'check-errors': c.checkErrors, filename, format: 'qcow2' };
  const cs = 2 ** h.clusterBits;
  if (c.corruptions) r.corruptions = c.corruptions;
  if (c.leaks) r.leaks = c.leaks;
  if (c.imageEnd) r['image-end-offset'] = c.imageEnd;
  const total = Math.ceil(h.size / cs);
  if (total) r['total-clusters'] = total;
  if (c.allocated) r['allocated-clusters'] = c.allocated;
  if (c.fragmented) r['fragmented-clusters'] = c.fragmented;
  if (c.compressed) r['compressed-clusters'] = c.compressed;
  return r;
}

async function openForCheck(file: HostFile, h: Qcow2Header, readOnly: boolean): Promise<Qcow2Image> {
  const img = new Qcow2Image(file, h, { readOnly });
  await img.load();
  return img;
}

/**
 * Rewrites refcounts to match the references: first raises the too-low ones (corruptions,
 * with 'all'), writes them back, then lowers leaked ones, so that a crash in between
 * leaves at worst leaks. New refcount blocks are placed after every referenced cluster.
 */
async function repair(file: HostFile, h: Qcow2Header, mode: 'leaks' | 'all'): Promise<void> {
  const img = await openForCheck(file, h, false);
  const { refs, copiedFixes } = await analyse(file, h, img);
  const rc = img.refcounts;
  const cs = img.clusterSize;
  const limit = Math.max(Math.ceil(file.length() / cs), refs.denseLength);
  const ups: Array<[number, number]> = [];
  const downs: Array<[number, number]> = [];
  const clusters: number[] = [];
  for (let c = 0; c < limit; c++) clusters.push(c);
  for (const k of refs.sparse.keys()) if (k >= limit) clusters.push(k);
  for (const c of clusters) {
    const want = refs.get(c);
    const have = await rc.get(c);
    if (have < want) ups.push([c, want - have]);
    else if (have > want) downs.push([c, have - want]);
  }
  for (let i = 0; i < rc.table.length; i++) {
    const b = rc.table[i]!;
    if (b === 0) continue;
    for (let c = Math.max(i * rc.blockEntries, limit); c < (i + 1) * rc.blockEntries; c++) {
      const have = await rc.get(c);
      if (have > 0) downs.push([c, have]);
    }
  }
  if (mode === 'all') {
    // new refcount blocks must not land on referenced clusters
    const past = Math.max(limit, ...ups.map(([c]) => c + 1));
    rc.freeIndex = past;
    for (const [c, d] of ups) while (!(await rc.update(c, 1, d))) rc.freeIndex = Math.max(rc.freeIndex, past);
    await img.writeback();
    await file.flush();
    for (const f of copiedFixes) {
      const e = await file.read(f.at, 8);
      const hi = e.readUInt32BE(0);
      e.writeUInt32BE((f.set ? hi | L2_COPIED_HI : hi & ~L2_COPIED_HI) >>> 0, 0);
      await file.write(f.at, e);
    }
    if (copiedFixes.length) await file.flush();
  }
  for (const [c, d] of downs) while (!(await rc.update(c, 1, -d))) { /* decrements never allocate */ }
  await img.writeback();
  await file.flush();
}

/** Repairs a dirty (lazy_refcounts) image and clears its dirty bit (driver open). */
export async function repairImage(file: HostFile, h: Qcow2Header): Promise<void> {
  await repair(file, h, 'all');
  const img = new Qcow2Image(file, h, { readOnly: false });
  img.header.incompatible &= ~INCOMPAT_DIRTY;
  await img.writeHeader();
  await file.flush();
}

export async function checkQcow2(filename: string, opts: { repair?: 'leaks' | 'all' } = {}): Promise<Qcow2CheckResult> {
  let file: FsHostFile;
  try {
    file = await FsHostFile.open(filename, opts.repair !== undefined);
  } catch (e) {
    throw new InvalidArgumentError(`Could not open '${filename}': ${(e as Error).message}`, { cause: e });
  }
  try {
    const h = await readHeader(file);
    checkSupported(h, true, filename);
    const before = await analyse(file, h, await openForCheck(file, h, true));
    if (!opts.repair || (before.counts.corruptions === 0 && before.counts.leaks === 0)) {
      return toResult(filename, h, before.counts);
    }
    await repair(file, h, opts.repair);
    const h2 = await readHeader(file);
    const after = await analyse(file, h2, await openForCheck(file, h2, true));
    const r = toResult(filename, h2, after.counts);
    const leaksFixed = before.counts.leaks - after.counts.leaks;
    const corrFixed = before.counts.corruptions - after.counts.corruptions;
    if (leaksFixed > 0) r['leaks-fixed'] = leaksFixed;
    if (corrFixed > 0) r['corruptions-fixed'] = corrFixed;
    return r;
  } finally {
    await file.close();
  }
}
