// make_empty: the image becomes fully unallocated so the backing chain shows through.
//
// Swap path (cost independent of the data held, and no sync at all): when the file can be
// replaced atomically (the file driver on a regular file: HostFile.prepareReplacement), a
// fresh empty image with the very same layout is prepared beside it in the background after
// each make_empty (written and made stable there, off the caller's path), and the next
// make_empty renames it over the image: a crash at any point leaves either the old image or
// the new empty one, both consistent. The old file's data is freed when its descriptor
// closes, in the background, and its dirty pages are dropped unwritten. The prepared image
// is used only when the layout and header it was built from are still the image's
// (`layoutKey`); otherwise, or while it is still being written, the fast path runs.
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
import { EXT_BITMAPS, serializeHeader } from './header.js';
import type { Qcow2Image } from './image.js';
import type { HostFile, PreparedReplacement } from './host-file.js';
import { discardRange } from './io.js';
import { BlockError } from '../../../errors.js';
import { record, span, traceNow, tracing } from '../../../util/trace.js';

export type MakeEmptyPath = 'swap' | 'fast' | 'slow';

export async function makeEmpty(img: Qcow2Image, spare?: EmptySpare | null): Promise<MakeEmptyPath> {
  const t0 = traceNow();
  const path = await makeEmptyPath(img, spare);
  if (tracing) record(`make-empty.${path}`, -1, t0, traceNow());
  return path;
}

async function makeEmptyPath(img: Qcow2Image, spare?: EmptySpare | null): Promise<MakeEmptyPath> {
  img.checkWritable();
  const path = await img.whenIdle(0, Number.MAX_SAFE_INTEGER, async (): Promise<MakeEmptyPath | null> => {
    await img.settleTruncate();
    if (!canUseFastPath(img)) return null;
    const ready = spare?.take(img) ?? null;
    let swapped = false;
    if (ready) {
      try {
        await span('make-empty.rename', -1, ready.commit());
        swapped = true;
      } catch {
        // the rename did not happen: the image file is untouched, empty it in place
      }
    }
    if (swapped) resetToEmpty(img);
    else await fastPath(img);
    spare?.prepare(img);
    return swapped ? 'swap' : 'fast';
  });
  if (path) return path;
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

/** The in-memory state of the emptied image: nothing cached, only refcount block 0. */
function resetToEmpty(img: Qcow2Image): void {
  const rc = img.refcounts;
  // Nothing cached is worth keeping: the tables it describes are dropped.
  img.l2Cache.clear();
  rc.cache.clear();
  rc.dirtyTable.clear();
  img.dirtyL1.clear();
  img.pendingFrees = [];
  img.l1.fill(0);
  img.l1Copied.fill(false);
  const block0 = rc.table[0]!;
  rc.table.fill(0);
  rc.table[0] = block0;
  rc.freeIndex = 0;
}

/** The metadata of the emptied image: refcount table with only block 0, block 0 counting the metadata. */
function emptyTables(img: Qcow2Image): { table: Buffer; block: Buffer; meta: number[] } {
  const cs = img.clusterSize;
  const rc = img.refcounts;
  const table = Buffer.alloc(rc.tableClusters * cs);
  table.writeBigUInt64BE(BigInt(rc.table[0]!), 0);
  const meta = metadataClusters(img);
  const block = Buffer.alloc(cs);
  for (const c of meta) rc.setEntry(block, c, 1);
  return { table, block, meta };
}

async function fastPath(img: Qcow2Image): Promise<void> {
  const cs = img.clusterSize;
  const rc = img.refcounts;
  const h = img.header;
  const { table, block, meta } = emptyTables(img);
  const block0 = rc.table[0]!;
  const l1Bytes = img.l1.length * 8;
  if (l1Bytes > 0) img.checkOverlap(OL.ACTIVE_L1, h.l1TableOffset, l1Bytes);
  img.checkOverlap(OL.REFCOUNT_TABLE, rc.tableOffset, table.length);
  resetToEmpty(img);
  img.checkOverlap(OL.REFCOUNT_BLOCK, block0, cs);
  await img.markDirtyBit();
  // 1. empty L1, stable before any refcount drops
  if (l1Bytes > 0) await img.file.write(h.l1TableOffset, Buffer.alloc(l1Bytes), true);
  // 2. refcount table with only block 0, and 3. refcount block 0 counting the metadata
  // only: both lower refcounts of clusters nothing references, in either order
  await Promise.all([img.file.write(rc.tableOffset, table, true), img.file.write(block0, block, true)]);
  // 4. drop the data. The metadata is final and stable already, so the truncation (whose
  // cost grows with the data the file system frees) runs in the background; allocations
  // wait for it.
  const end = (Math.max(...meta) + 1) * cs;
  if (img.file.length() > end) img.startTruncate(end);
}

/**
 * What an empty image prepared now is valid for: the header (as it would be written) and
 * the metadata layout. A spare is only used while the image still has exactly these.
 */
function layoutKey(img: Qcow2Image): string {
  const rc = img.refcounts;
  return `${serializeHeader(img.header).toString('hex')}/${rc.table[0] ?? 0}/${img.l1.length}`;
}

/** The bytes of the image emptied by the fast path: header, refcount table, block 0, zero L1. */
function emptyImageBytes(img: Qcow2Image): Buffer {
  const cs = img.clusterSize;
  const rc = img.refcounts;
  const { table, block, meta } = emptyTables(img);
  const out = Buffer.alloc((Math.max(...meta) + 1) * cs);
  serializeHeader(img.header).copy(out, 0);
  table.copy(out, rc.tableOffset);
  block.copy(out, rc.table[0]!);
  return out; // the L1 table is zeroes
}

/**
 * The empty image prepared beside an overlay for its next make_empty (one per image). Not
 * used with lazy refcounts (the dirty bit is part of the header's state).
 */
export class EmptySpare {
  private key = '';
  private ready: PreparedReplacement | null = null;
  private preparing = false;
  private failures = 0;
  private closed = false;
  private work: Promise<void> = Promise.resolve();

  constructor(private readonly file: HostFile) {}

  /** The prepared image if it is ready and fits the image as it is now (taken: used once). */
  take(img: Qcow2Image): PreparedReplacement | null {
    const r = this.ready;
    if (!r) return null;
    this.ready = null;
    if (this.key === layoutKey(img)) return r;
    void r.discard().catch(() => undefined);
    return null;
  }

  /**
   * Starts preparing an empty image for the image as it is now (the caller holds the image's
   * mutex, so the layout read here is consistent). Runs in the background; a failure only
   * means the next make_empty takes the fast path (after three, spares are not tried again).
   */
  prepare(img: Qcow2Image): void {
    const prepare = this.file.prepareReplacement?.bind(this.file);
    if (!prepare || this.preparing || this.closed || this.failures >= 3 || img.lazyRefcounts || !canUseFastPath(img)) return;
    const key = layoutKey(img);
    if (this.ready && this.key === key) return;
    const content = emptyImageBytes(img);
    this.preparing = true;
    const old = this.ready;
    this.ready = null;
    this.work = (async () => {
      try {
        if (old) await old.discard().catch(() => undefined);
        const r = await prepare(content);
        if (this.closed) {
          await r.discard().catch(() => undefined);
          return;
        }
        this.key = key;
        this.ready = r;
      } catch (e) {
        // a file that cannot be replaced (a symlink, a second link) is not tried again
        this.failures += e instanceof BlockError && e.code === 'ENOTSUP' ? 3 : 1;
      } finally {
        this.preparing = false;
      }
    })();
  }

  /** Waits until no preparation is under way. */
  idle(): Promise<void> {
    return this.work;
  }

  /** Removes the prepared image (the node closes or becomes read-only). */
  async discard(): Promise<void> {
    const r = this.ready;
    this.ready = null;
    if (r) await r.discard().catch(() => undefined);
  }

  /** No more spares: the image closes. */
  async close(): Promise<void> {
    this.closed = true;
    await this.work;
    await this.discard();
  }
}
