// The qcow2 data path: read, write (with copy-on-write from the backing view), write
// zeroes, discard and block status, over an open Qcow2Image.
//
// Locking: the guest-cluster -> host-cluster mapping is looked up and changed under the
// image mutex; data I/O runs outside it, counted as in flight so that no host cluster it
// touches is freed and reused meanwhile (image.ts step 5). A write that needs new clusters
// (unallocated, zero, compressed or shared ones) allocates them and marks the guest
// clusters as being allocated before releasing the mutex, and links them into the L2 table
// after its data is written; every other write, write-zeroes or discard touching those
// guest clusters waits until then, so a cluster is never allocated twice. Reads do not
// wait: they see the old mapping until the new one is linked.

import { inflateRawSync, constants as zc } from 'node:zlib';
import { BlockError } from '../../../errors.js';
import type { BlockStatus } from '../../driver.js';
import type { BlockNode } from '../../node.js';
import type { Qcow2Image } from './image.js';
import { OL } from './overlap.js';
import { span } from '../../../util/trace.js';
import {
  ClusterKind,
  compressedClusters,
  readCompressed,
  readL2,
  writeL2Normal,
  writeL2Unallocated,
  writeL2Zero,
  type L2Entry,
} from './l2-entry.js';

type Segment =
  | { kind: 'host'; host: number; dst: number; len: number }
  | { kind: 'backing'; guest: number; dst: number; len: number }
  | { kind: 'zero'; dst: number; len: number }
  | { kind: 'compressed'; table: Buffer; index: number; inOff: number; dst: number; len: number };

const UNALLOCATED: L2Entry = { kind: ClusterKind.Unallocated, offset: 0, copied: false };

async function entryAt(img: Qcow2Image, cluster: number): Promise<{ entry: L2Entry; table: Buffer | null; index: number }> {
  const l1i = Math.floor(cluster / img.l2Entries);
  const index = cluster % img.l2Entries;
  const table = await img.getL2(l1i);
  if (!table) return { entry: UNALLOCATED, table: null, index };
  return { entry: readL2(table, index, img.v3), table, index };
}

function checkDataOffset(img: Qcow2Image, e: L2Entry, cluster: number): void {
  if (e.kind !== ClusterKind.Normal) return;
  if (e.offset % img.clusterSize !== 0) {
    throw img.markCorrupt(`L2 entry of guest cluster ${cluster} has an unaligned host offset 0x${e.offset.toString(16)}`);
  }
  if (e.offset >= img.file.length()) {
    throw img.markCorrupt(`L2 entry of guest cluster ${cluster} points past the end of the file (0x${e.offset.toString(16)} >= ${img.file.length()})`);
  }
  if (img.overlapsFixedMetadata(e.offset, img.clusterSize)) {
    throw img.markCorrupt(`L2 entry of guest cluster ${cluster} points into metadata (0x${e.offset.toString(16)})`);
  }
}

async function readBacking(img: Qcow2Image, guest: number, len: number): Promise<Buffer> {
  const out = Buffer.allocUnsafeSlow(len);
  await readBackingInto(img, guest, out);
  return out;
}

/** What the backing view shows at `guest` (zeroes without one, or past its end), into out. */
async function readBackingInto(img: Qcow2Image, guest: number, out: Buffer): Promise<void> {
  const b = img.backing;
  const blen = b ? b.length() : 0;
  const n = b ? Math.max(0, Math.min(out.length, blen - guest)) : 0;
  if (n > 0) {
    const part = n === out.length ? out : out.subarray(0, n);
    if (b!.readInto) await b!.readInto(guest, part);
    else (await b!.read(guest, n)).copy(part);
  }
  if (n < out.length) out.fill(0, n);
}

/** The host file's bytes at `host`, into out. */
function readHostInto(img: Qcow2Image, host: number, out: Buffer): Promise<void> {
  if (img.file.readInto) return img.file.readInto(host, out);
  return img.file.read(host, out.length).then((b) => void b.copy(out));
}

async function readCompressedCluster(img: Qcow2Image, table: Buffer, index: number): Promise<Buffer> {
  const c = readCompressed(table, index, img.clusterBits);
  const fileLen = img.file.length();
  if (c.offset >= fileLen || img.overlapsFixedMetadata(c.offset, c.length)) {
    throw img.markCorrupt(`compressed cluster at 0x${c.offset.toString(16)} lies outside the data area`);
  }
  const raw = await img.file.read(c.offset, Math.min(c.length, fileLen - c.offset));
  let out: Buffer;
  try {
    out = inflateRawSync(raw, { finishFlush: zc.Z_SYNC_FLUSH, maxOutputLength: img.clusterSize });
  } catch (e) {
    if ((e as { code?: string }).code === 'ERR_BUFFER_TOO_LARGE') {
      out = inflateRawSync(raw, { finishFlush: zc.Z_SYNC_FLUSH }).subarray(0, img.clusterSize);
    } else {
      throw new BlockError('EIO', `qcow2: compressed cluster at 0x${c.offset.toString(16)} cannot be decompressed: ${(e as Error).message}`);
    }
  }
  if (out.length < img.clusterSize) {
    throw new BlockError('EIO', `qcow2: compressed cluster at 0x${c.offset.toString(16)} decompresses to ${out.length} bytes, not ${img.clusterSize}`);
  }
  return out.length === img.clusterSize ? out : out.subarray(0, img.clusterSize);
}

export async function readRange(img: Qcow2Image, offset: number, length: number): Promise<Buffer> {
  const out = Buffer.allocUnsafeSlow(length);
  await readRangeInto(img, offset, out);
  return out;
}

/**
 * Reads guest bytes [offset, offset + out.length) into out: the range is mapped once under
 * the mutex (each L2 table looked up once, contiguous host clusters merged into one file read),
 * then every segment is read straight into its place in out; zero and unallocated clusters
 * without backing are zero-filled there, nothing else is.
 */
export function readRangeInto(img: Qcow2Image, offset: number, out: Buffer): Promise<void> {
  return fastReadInto(img, offset, out) ?? lockedReadInto(img, offset, out);
}

/**
 * The read without a wait when the cached mapping answers it: the mutex free (no metadata
 * operation half done), the range within one L2 table that is cached, every cluster a
 * normal one and contiguous on the host. The mapping is read synchronously, so nothing can
 * change it meanwhile, and the checks are the locked path's. null: take the locked path.
 * (Issue 18: the mutex, the table lookup and the writeback check were three awaits of a
 * 64 KiB read.)
 */
function fastReadInto(img: Qcow2Image, offset: number, out: Buffer): Promise<void> | null {
  const length = out.length;
  if (length === 0 || img.mutex.isLocked) return null;
  const cs = img.clusterSize;
  const c0 = Math.floor(offset / cs);
  const cLast = Math.floor((offset + length - 1) / cs);
  const l1i = Math.floor(c0 / img.l2Entries);
  if (Math.floor(cLast / img.l2Entries) !== l1i) return null;
  const tableOffset = img.l1[l1i] ?? 0;
  if (tableOffset === 0) return null;
  const table = img.l2Cache.peek(tableOffset);
  if (!table) return null;
  let first = 0;
  for (let c = c0; c <= cLast; c++) {
    const e = readL2(table, c % img.l2Entries, img.v3);
    if (e.kind !== ClusterKind.Normal) return null;
    if (c === c0) first = e.offset;
    else if (e.offset !== first + (c - c0) * cs) return null;
    try {
      checkDataOffset(img, e, c);
    } catch (err) {
      return Promise.reject(err);
    }
  }
  const done = img.beginData();
  return readHostInto(img, first + (offset - c0 * cs), out).then(done, (err: unknown) => {
    done();
    throw err;
  });
}

async function lockedReadInto(img: Qcow2Image, offset: number, out: Buffer): Promise<void> {
  const cs = img.clusterSize;
  const length = out.length;
  const segs: Segment[] = [];
  const release = img.mutex.tryLock() ?? (await img.mutex.lock());
  let done: (() => void) | null = null;
  // the L2 table of the clusters looked at: fetched once per table, not once per cluster
  // (a cached table stays valid under the mutex until the next eviction)
  let tableIndex = -1;
  let table: Buffer | null = null;
  try {
    for (let pos = offset; pos < offset + length; ) {
      const cluster = Math.floor(pos / cs);
      const inOff = pos - cluster * cs;
      const len = Math.min(cs - inOff, offset + length - pos);
      const dst = pos - offset;
      const l1i = Math.floor(cluster / img.l2Entries);
      if (l1i !== tableIndex) {
        table = await img.getL2(l1i);
        tableIndex = l1i;
      }
      const index = cluster % img.l2Entries;
      const entry = table ? readL2(table, index, img.v3) : UNALLOCATED;
      const last = segs[segs.length - 1];
      switch (entry.kind) {
        case ClusterKind.Normal: {
          checkDataOffset(img, entry, cluster);
          const host = entry.offset + inOff;
          if (last?.kind === 'host' && last.host + last.len === host && last.dst + last.len === dst) last.len += len;
          else segs.push({ kind: 'host', host, dst, len });
          break;
        }
        case ClusterKind.Unallocated:
        case ClusterKind.Zero:
          // unallocated clusters show the backing view; without one they read as zeroes
          if (entry.kind === ClusterKind.Unallocated && img.backing) {
            if (last?.kind === 'backing' && last.guest + last.len === pos) last.len += len;
            else segs.push({ kind: 'backing', guest: pos, dst, len });
          } else if (last?.kind === 'zero' && last.dst + last.len === dst) last.len += len;
          else segs.push({ kind: 'zero', dst, len });
          break;
        case ClusterKind.Compressed:
          segs.push({ kind: 'compressed', table: Buffer.from(table!.subarray(index * 8, index * 8 + 8)), index: 0, inOff, dst, len });
          break;
      }
      pos += len;
    }
    await img.maybeWriteback();
    done = img.beginData();
  } finally {
    release();
  }
  try {
    for (const s of segs) {
      const part = s.dst === 0 && s.len === length ? out : out.subarray(s.dst, s.dst + s.len);
      if (s.kind === 'host') await readHostInto(img, s.host, part);
      else if (s.kind === 'backing') await readBackingInto(img, s.guest, part);
      else if (s.kind === 'zero') part.fill(0);
      else (await readCompressedCluster(img, s.table, s.index)).copy(part, 0, s.inOff, s.inOff + s.len);
    }
  } finally {
    done();
  }
}

/** What a guest cluster reads as before this write (the copy-on-write source). */
async function oldContent(img: Qcow2Image, cluster: number, entry: L2Entry, table: Buffer | null, index: number): Promise<Buffer> {
  switch (entry.kind) {
    case ClusterKind.Normal:
      checkDataOffset(img, entry, cluster);
      return img.file.read(entry.offset, img.clusterSize);
    case ClusterKind.Compressed:
      return Buffer.from(await readCompressedCluster(img, table!, index));
    case ClusterKind.Zero:
      return Buffer.alloc(img.clusterSize);
    default:
      return readBacking(img, cluster * img.clusterSize, img.clusterSize);
  }
}

/** Queues the release of whatever host clusters an L2 entry being replaced held. */
function releaseEntry(img: Qcow2Image, entry: L2Entry, table: Buffer, index: number): void {
  if (entry.kind === ClusterKind.Compressed) {
    const r = compressedClusters(readCompressed(table, index, img.clusterBits), img.clusterSize);
    img.free(r.first, r.count);
  } else if (entry.offset !== 0 && (entry.kind === ClusterKind.Normal || entry.kind === ClusterKind.Zero)) {
    img.free(entry.offset / img.clusterSize, 1);
  }
}

interface Allocation {
  cluster: number;
  n: number;
  l1i: number;
  host: number;
  buf: Buffer;
  /** where buf starts within the allocation */
  at: number;
  /** the rest of the clusters reads as zeroes: zero them with one zero-range call (or, where
   *  the store cannot, write buf padded with zeroes) */
  zeroFill: boolean;
}

/** Phase 2 for one allocation: its data, and its zero fill if it has one. */
async function writeAllocation(img: Qcow2Image, a: Allocation): Promise<void> {
  const len = a.n * img.clusterSize;
  if (a.zeroFill && a.buf.length < len) {
    if (img.file.zeroRange && (await img.file.zeroRange(a.host, len))) return img.file.write(a.host + a.at, a.buf);
    const full = Buffer.alloc(len);
    a.buf.copy(full, a.at);
    return img.file.write(a.host, full);
  }
  return img.file.write(a.host + a.at, a.buf);
}

/** Whether a cluster's content before this write is all zeroes, known without I/O. */
function readsAsZero(img: Qcow2Image, e: L2Entry): boolean {
  return e.kind === ClusterKind.Zero || (e.kind === ClusterKind.Unallocated && !img.backing);
}

/**
 * Writes `data`. Phase 1 (mutex): map the range; clusters that need allocation get their
 * copy-on-write content, their L2 table and host clusters, and are marked as in flight.
 * Phase 2 (no mutex): data I/O. Phase 3 (mutex): the L2 entries of the new clusters are
 * set (or, after an I/O error, the clusters are freed) and the in-flight marks cleared.
 * Any write, zero or discard touching an in-flight cluster waits for it first.
 */
export async function writeRange(img: Qcow2Image, offset: number, data: Buffer): Promise<void> {
  const cs = img.clusterSize;
  const end = offset + data.length;
  const inPlace: Array<{ host: number; src: number; len: number }> = [];
  const allocs: Allocation[] = [];
  let done: (() => void) | null = null;
  let finish: (() => void) | null = null;
  for (;;) {
    const release = img.mutex.tryLock() ?? (await span('q2.lock1', offset, img.mutex.lock()));
    let busy: Promise<void> | null = null;
    try {
      img.checkWritable();
      busy = img.allocationInFlight(Math.floor(offset / cs), Math.floor((end - 1) / cs));
      if (!busy) {
        await planWrite(img, offset, data, inPlace, allocs);
        if (allocs.length > 0) finish = img.markInFlight(allocs.map((a) => [a.cluster, a.n] as const));
        await img.maybeWriteback();
        done = img.beginData();
      }
    } catch (e) {
      // nothing was linked: give the clusters allocated so far back
      for (const a of allocs) {
        try {
          img.free(a.host / cs, a.n);
        } catch {
          /* the image was marked corrupt: nothing is written any more */
        }
      }
      finish?.();
      throw e;
    } finally {
      release();
    }
    if (!busy) break;
    await span('q2.inflight', offset, busy);
  }
  let ioError: unknown = null;
  try {
    // Every piece settles before the write does: a caller may reuse `data` once it fails.
    const results = await Promise.allSettled([
      ...inPlace.map((w) => img.file.write(w.host, data.subarray(w.src, w.src + w.len))),
      ...allocs.map((a) => writeAllocation(img, a)),
    ]);
    for (const r of results) if (r.status === 'rejected') throw r.reason;
  } catch (e) {
    ioError = e;
  } finally {
    done?.();
  }
  if (allocs.length > 0) {
    const release = img.mutex.tryLock() ?? (await span('q2.lock3', offset, img.mutex.lock()));
    try {
      for (const a of allocs) {
        if (ioError) {
          img.free(a.host / cs, a.n);
          continue;
        }
        const table = await img.getL2ForWrite(a.l1i);
        for (let k = 0; k < a.n; k++) {
          const idx = (a.cluster + k) % img.l2Entries;
          releaseEntry(img, readL2(table, idx, img.v3), table, idx);
          writeL2Normal(table, idx, a.host + k * cs);
        }
      }
      await img.maybeWriteback();
    } finally {
      finish!();
      release();
    }
  }
  if (ioError) throw ioError;
}

/** Phase 1 of writeRange (under the mutex). */
async function planWrite(
  img: Qcow2Image,
  offset: number,
  data: Buffer,
  inPlace: Array<{ host: number; src: number; len: number }>,
  allocs: Allocation[],
): Promise<void> {
  const cs = img.clusterSize;
  const end = offset + data.length;
  for (let pos = offset; pos < end; ) {
    const cluster = Math.floor(pos / cs);
    const l1i = Math.floor(cluster / img.l2Entries);
    const first = await entryAt(img, cluster);
    if (first.entry.kind === ClusterKind.Normal && first.entry.copied) {
      const inOff = pos - cluster * cs;
      const len = Math.min(cs - inOff, end - pos);
      const host = first.entry.offset + inOff;
      // QEMU's pre-write check of a data write: on metadata, the image is marked corrupt
      img.checkOverlap(OL.NONE, host, len);
      checkDataOffset(img, first.entry, cluster);
      const last = inPlace[inPlace.length - 1];
      if (last && last.host + last.len === host && last.src + last.len === pos - offset) last.len += len;
      else inPlace.push({ host, src: pos - offset, len });
      pos += len;
      continue;
    }
    // a run of clusters needing allocation, within one L2 table
    const tableEnd = (l1i + 1) * img.l2Entries;
    let n = 1;
    while (cluster + n < tableEnd && (cluster + n) * cs < end) {
      const e = first.table ? readL2(first.table, (cluster + n) % img.l2Entries, img.v3) : UNALLOCATED;
      if (e.kind === ClusterKind.Normal && e.copied) break;
      n++;
    }
    const runEnd = Math.min(end, (cluster + n) * cs);
    const head = pos - cluster * cs;
    const tailStart = runEnd - (cluster + n - 1) * cs; // bytes of the last cluster covered
    const lastEntry = (): L2Entry => (n === 1 ? first.entry : first.table ? readL2(first.table, (cluster + n - 1) % img.l2Entries, img.v3) : UNALLOCATED);
    if ((head > 0 || tailStart < cs) && readsAsZero(img, first.entry) && readsAsZero(img, lastEntry())) {
      // The copy-on-write fill is zeroes: QEMU's way, one zero-range call over the new
      // clusters and then only the guest's bytes, instead of a buffer of zeroes around them
      // (a 4 KiB write into a new 64 KiB cluster stays a 4 KiB write). Same file, same map.
      await img.getL2ForWrite(l1i);
      const host = await img.allocData(n);
      allocs.push({ cluster, n, l1i, host, buf: data.subarray(pos - offset, runEnd - offset), at: head, zeroFill: true });
      pos = runEnd;
      continue;
    }
    let buf: Buffer;
    if (head === 0 && tailStart === cs) {
      buf = data.subarray(pos - offset, runEnd - offset);
    } else {
      buf = Buffer.allocUnsafe(n * cs);
      if (head > 0) {
        const old = await oldContent(img, cluster, first.entry, first.table, first.index);
        old.copy(buf, 0, 0, head);
        if (n === 1 && tailStart < cs) old.copy(buf, tailStart, tailStart, cs);
      }
      if (tailStart < cs && !(n === 1 && head > 0)) {
        const lc = cluster + n - 1;
        const le = first.table ? readL2(first.table, lc % img.l2Entries, img.v3) : UNALLOCATED;
        const old = await oldContent(img, lc, le, first.table, lc % img.l2Entries);
        old.copy(buf, (n - 1) * cs + tailStart, tailStart, cs);
      }
      data.copy(buf, head, pos - offset, runEnd - offset);
    }
    // QEMU's order: the L2 table first, then the data clusters
    await img.getL2ForWrite(l1i);
    const host = await img.allocData(n);
    allocs.push({ cluster, n, l1i, host, buf, at: 0, zeroFill: false });
    pos = runEnd;
  }
}

/**
 * Write zeroes (v3): whole clusters become zero clusters (their host clusters are freed),
 * partial clusters are written with zero bytes unless they already read as zeroes.
 */
export async function zeroRange(img: Qcow2Image, offset: number, length: number): Promise<void> {
  const cs = img.clusterSize;
  const end = offset + length;
  const firstFull = Math.ceil(offset / cs) * cs;
  const lastFull = Math.floor(end / cs) * cs;
  if (firstFull >= lastFull) {
    await zeroPartial(img, offset, length);
    return;
  }
  if (offset < firstFull) await zeroPartial(img, offset, firstFull - offset);
  await eachTable(img, firstFull / cs, lastFull / cs, {
    // a whole unallocated table that reads as zeroes
    skipTable: (c) => !backingCovers(img, c),
    needs: (entry, c) =>
      !(entry.kind === ClusterKind.Zero && entry.offset === 0) && !(entry.kind === ClusterKind.Unallocated && !backingCovers(img, c)),
    apply: (table, idx) => {
      releaseEntry(img, readL2(table, idx, img.v3), table, idx);
      writeL2Zero(table, idx);
    },
  });
  if (end > lastFull) await zeroPartial(img, lastFull, end - lastFull);
}

interface TableEdit {
  /** for a table not allocated at all, from its first cluster: nothing to change in it */
  skipTable(firstCluster: number): boolean;
  /** whether the entry of guest cluster `cluster` must change */
  needs(entry: L2Entry, cluster: number): boolean;
  /** changes entry `index` (guest cluster `cluster`) of a writable table */
  apply(table: Buffer, index: number, cluster: number): void;
}

/**
 * Edits the L2 entries of guest clusters [first, end), one L2 table at a time: each table
 * under the mutex (once allocations in flight on it have landed), the event loop getting its
 * turn between tables. A table is made writable (allocated, or copied from a snapshot) only
 * when one of its entries needs a change.
 */
async function eachTable(img: Qcow2Image, first: number, end: number, edit: TableEdit): Promise<void> {
  for (let c0 = first; c0 < end; ) {
    const l1i = Math.floor(c0 / img.l2Entries);
    const c1 = Math.min(end, (l1i + 1) * img.l2Entries);
    if (c0 > first) await img.pacer?.pace();
    await img.whenIdle(c0, c1 - 1, async () => {
      img.checkWritable();
      if (img.l1[l1i] === 0 && edit.skipTable(c0)) return;
      let table = await img.getL2(l1i);
      let writable = false;
      for (let c = c0; c < c1; c++) {
        const idx = c % img.l2Entries;
        if (!edit.needs(table ? readL2(table, idx, img.v3) : UNALLOCATED, c)) continue;
        if (!writable) {
          // a new table starts as a copy of the old one (or unallocated): same entries
          table = await img.getL2ForWrite(l1i);
          writable = true;
        }
        edit.apply(table!, idx, c);
      }
      await img.maybeWriteback();
    });
    c0 = c1;
  }
}

function backingCovers(img: Qcow2Image, cluster: number): boolean {
  return img.backing !== null && cluster * img.clusterSize < img.backing.length();
}

/** Zeroes parts of clusters (the range may touch two clusters), skipping those reading as zero. */
async function zeroPartial(img: Qcow2Image, offset: number, length: number): Promise<void> {
  const cs = img.clusterSize;
  for (let pos = offset; pos < offset + length; ) {
    const cluster = Math.floor(pos / cs);
    const n = Math.min((cluster + 1) * cs, offset + length) - pos;
    const skip = await img.mutex.run(async () => {
      const { entry } = await entryAt(img, cluster);
      return entry.kind === ClusterKind.Zero || (entry.kind === ClusterKind.Unallocated && !backingCovers(img, cluster));
    });
    if (!skip) await writeRange(img, pos, Buffer.alloc(n));
    pos += n;
  }
}

/**
 * Discard whole clusters. A guest discard (full=false) leaves v3 clusters reading as
 * zeroes where the backing file or data would otherwise show (QEMU); full=true (make_empty's
 * slow path) makes them unallocated. Partial clusters are left alone (discard is advisory).
 */
export async function discardRange(img: Qcow2Image, offset: number, length: number, full: boolean): Promise<void> {
  const cs = img.clusterSize;
  const first = Math.ceil(offset / cs);
  const last = Math.floor((offset + length) / cs);
  if (first >= last) return;
  const zeroes = (entry: L2Entry, c: number): boolean =>
    !full && img.v3 && (entry.kind !== ClusterKind.Unallocated || backingCovers(img, c));
  await eachTable(img, first, last, {
    skipTable: (c) => full || !img.v3 || !backingCovers(img, c),
    needs: (entry, c) => {
      if (zeroes(entry, c)) return !(entry.kind === ClusterKind.Zero && entry.offset === 0);
      return entry.kind !== ClusterKind.Unallocated;
    },
    apply: (table, idx, c) => {
      const entry = readL2(table, idx, img.v3);
      const zero = zeroes(entry, c);
      releaseEntry(img, entry, table, idx);
      if (zero) writeL2Zero(table, idx);
      else writeL2Unallocated(table, idx);
    },
  });
}

/** This layer's status at `offset`, extended over clusters with the same answer. */
export async function blockStatusAt(img: Qcow2Image, offset: number, length: number, file: BlockNode | null): Promise<BlockStatus> {
  const cs = img.clusterSize;
  return img.mutex.run(async () => {
    const c0 = Math.floor(offset / cs);
    const first = await entryAt(img, c0);
    const kind = first.entry.kind;
    if (kind === ClusterKind.Normal) checkDataOffset(img, first.entry, c0);
    const inOff = offset - c0 * cs;
    let len = Math.min(cs - inOff, length);
    let c = c0 + 1;
    let expectHost = first.entry.offset + cs;
    // the table of the cluster looked at: fetched once per table, entries read in a plain loop
    let tableIndex = Math.floor(c0 / img.l2Entries);
    let table = first.table;
    while (len < length) {
      const l1i = Math.floor(c / img.l2Entries);
      let e: L2Entry;
      if (img.l1[l1i] === 0) {
        if (kind !== ClusterKind.Unallocated) break;
        // skip a whole unallocated L2 range at once
        const n = (l1i + 1) * img.l2Entries - c;
        len = Math.min(length, len + n * cs);
        c += n;
        continue;
      }
      if (l1i !== tableIndex || !table) {
        table = await img.getL2(l1i);
        tableIndex = l1i;
      }
      e = table ? readL2(table, c % img.l2Entries, img.v3) : UNALLOCATED;
      if (e.kind !== kind) break;
      if (kind === ClusterKind.Normal && e.offset !== expectHost) break;
      expectHost += cs;
      len = Math.min(length, len + cs);
      c++;
    }
    await img.maybeWriteback();
    switch (kind) {
      case ClusterKind.Normal: {
        const s: BlockStatus = { length: len, allocated: true, zero: false, data: true, hostOffset: first.entry.offset + inOff };
        if (file) s.file = file;
        return s;
      }
      case ClusterKind.Compressed:
        return { length: len, allocated: true, zero: false, data: true };
      case ClusterKind.Zero:
        return { length: len, allocated: true, zero: true, data: false };
      default: {
        // reads as zeroes without a backing file or past its end
        if (!img.backing || offset >= img.backing.length()) return { length: len, allocated: false, zero: true, data: false };
        return { length: Math.min(len, img.backing.length() - offset), allocated: false, zero: false, data: false };
      }
    }
  });
}
