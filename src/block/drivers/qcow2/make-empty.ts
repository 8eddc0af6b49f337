// make_empty: the image becomes fully unallocated so the backing chain shows through.
//
// Fast path (time independent of the data held): when the header, the refcount table, the
// first refcount block and the L1 table all lie in the range the first refcount block
// describes, rewrite the metadata as a fresh empty image in place and truncate the file.
// Every intermediate state is consistent up to leaked clusters:
//   1. zero the L1 table          -> every L2 table and data cluster is leaked;
//   2. keep only refcount table entry 0 -> clusters described by other blocks drop to 0,
//                                          and none of them is referenced any more;
//   3. rewrite refcount block 0 with only the metadata counted -> exact;
//   4. truncate the file after the metadata (in the background: the next allocation
//      waits for it, see Qcow2Image.pendingTruncate).
// Step 1 is stable before 2 and 3 are issued, and 2 and 3 before 4 (a refcount table or an
// L1 table on disk must never point past the end of the file). Each is a FUA write of its
// own range, not a flush: a flush would first write back every dirty page of the file, i.e.
// the very data this discards, so its cost would grow with the data (and the truncation
// drops those pages unwritten). The dirty cached tables are dropped, never written back.
// Otherwise (snapshots, bitmaps, metadata spread over several refcount blocks) every
// cluster is discarded one by one (the slow path).

import { OL } from './overlap.js';
import { EXT_BITMAPS } from './header.js';
import type { Qcow2Image } from './image.js';
import { discardRange } from './io.js';

export async function makeEmpty(img: Qcow2Image): Promise<'fast' | 'slow'> {
  img.checkWritable();
  const fast = await img.whenIdle(0, Number.MAX_SAFE_INTEGER, async () => {
    await img.settleTruncate();
    if (!canUseFastPath(img)) return false;
    await fastPath(img);
    return true;
  });
  if (fast) return 'fast';
  await discardRange(img, 0, img.header.size, true);
  await img.mutex.run(() => img.writeback());
  await img.file.flush();
  return 'slow';
}

function metadataClusters(img: Qcow2Image): number[] {
  const cs = img.clusterSize;
  const h = img.header;
  const rc = img.refcounts;
  const out = [0];
  for (let k = 0; k < rc.tableClusters; k++) out.push(rc.tableOffset / cs + k);
  out.push(rc.table[0]! / cs);
  const l1Clusters = Math.ceil((img.l1.length * 8) / cs);
  for (let k = 0; k < l1Clusters; k++) out.push(h.l1TableOffset / cs + k);
  return out;
}

function canUseFastPath(img: Qcow2Image): boolean {
  const h = img.header;
  if (h.nbSnapshots > 0 || h.hasBitmapsExtension || h.hasCryptoExtension || h.hasDataFileExtension) return false;
  if (h.unknownExtensions.some((e) => e.type === EXT_BITMAPS)) return false;
  const rc = img.refcounts;
  if (!rc.table[0] || rc.dirtyTable.has(0)) return false;
  const clusters = metadataClusters(img);
  if (new Set(clusters).size !== clusters.length) return false;
  return clusters.every((c) => c < rc.blockEntries);
}

async function fastPath(img: Qcow2Image): Promise<void> {
  const cs = img.clusterSize;
  const rc = img.refcounts;
  const h = img.header;
  // Nothing cached is worth keeping: the tables it describes are about to be dropped.
  img.l2Cache.clear();
  rc.cache.clear();
  rc.dirtyTable.clear();
  img.dirtyL1.clear();
  img.pendingFrees = [];
  await img.markDirtyBit();
  // 1. empty L1, stable before any refcount drops
  if (img.l1.length > 0) {
    img.checkOverlap(OL.ACTIVE_L1, h.l1TableOffset, img.l1.length * 8);
    await img.file.write(h.l1TableOffset, Buffer.alloc(img.l1.length * 8), true);
  }
  img.l1.fill(0);
  img.l1Copied.fill(false);
  // 2. refcount table with only block 0, and 3. refcount block 0 counting the metadata
  // only: both lower refcounts of clusters nothing references, in either order
  const block0 = rc.table[0]!;
  const table = Buffer.alloc(rc.tableClusters * cs);
  table.writeBigUInt64BE(BigInt(block0), 0);
  img.checkOverlap(OL.REFCOUNT_TABLE, rc.tableOffset, table.length);
  rc.table.fill(0);
  rc.table[0] = block0;
  const meta = metadataClusters(img);
  const block = Buffer.alloc(cs);
  for (const c of meta) rc.setEntry(block, c, 1);
  img.checkOverlap(OL.REFCOUNT_BLOCK, block0, cs);
  await Promise.all([img.file.write(rc.tableOffset, table, true), img.file.write(block0, block, true)]);
  rc.freeIndex = 0;
  // 4. drop the data. The metadata is final and stable already, so the truncation (whose
  // cost grows with the data the file system frees) runs in the background; allocations
  // wait for it.
  const end = (Math.max(...meta) + 1) * cs;
  if (img.file.length() > end) img.startTruncate(end);
}
