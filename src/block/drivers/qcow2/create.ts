// Image creation, laid out exactly as `qemu-img create -f qcow2` (QEMU 7.2) does: header
// cluster, refcount table (1 cluster), refcount block, then the L1 table allocated through
// the normal allocator (so that larger L1 tables pull in further refcount blocks the same
// way), then the header rewritten with its extensions and backing file name.

import { InvalidArgumentError } from '../../../errors.js';
import { newHeader } from './header.js';
import { FsHostFile } from './host-file.js';
import { Qcow2Image } from './image.js';
import { writeL2Normal } from './l2-entry.js';

export interface CreateQcow2Options {
  size: number;
  clusterSize?: number;
  backingFile?: string;
  backingFormat?: string;
  lazyRefcounts?: boolean;
  refcountBits?: number;
  compat?: '0.10' | '1.1';
  preallocation?: 'off' | 'metadata';
}

function log2(n: number): number {
  return Math.round(Math.log2(n));
}

export async function createQcow2(filename: string, opts: CreateQcow2Options): Promise<void> {
  const size = opts.size;
  const clusterSize = opts.clusterSize ?? 65536;
  const refcountBits = opts.refcountBits ?? 16;
  const compat = opts.compat ?? '1.1';
  const lazy = opts.lazyRefcounts ?? false;
  if (!Number.isSafeInteger(size) || size < 0) throw new InvalidArgumentError(`Invalid image size ${size}`);
  if (size % 512 !== 0) throw new InvalidArgumentError('Image size must be a multiple of 512 bytes');
  if (!Number.isInteger(clusterSize) || clusterSize < 512 || clusterSize > 2 * 1024 * 1024 || (clusterSize & (clusterSize - 1)) !== 0) {
    throw new InvalidArgumentError('Cluster size must be a power of two between 512 and 2048k');
  }
  if (!Number.isInteger(refcountBits) || refcountBits < 1 || refcountBits > 64 || (refcountBits & (refcountBits - 1)) !== 0) {
    throw new InvalidArgumentError('Refcount width must be a power of two and may not exceed 64 bits');
  }
  if (compat === '0.10' && refcountBits !== 16) {
    throw new InvalidArgumentError('Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)');
  }
  if (compat === '0.10' && lazy) {
    throw new InvalidArgumentError('Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)');
  }
  if (opts.backingFormat !== undefined && opts.backingFile === undefined) {
    throw new InvalidArgumentError('Backing format cannot be used without backing file');
  }
  if (opts.backingFile !== undefined && Buffer.byteLength(opts.backingFile) > 1023) {
    throw new InvalidArgumentError('Backing file name too long');
  }
  const clusterBits = log2(clusterSize);
  const h = newHeader({
    version: compat === '0.10' ? 2 : 3,
    clusterBits,
    size: 0,
    refcountOrder: log2(refcountBits),
    lazyRefcounts: lazy,
  });

  let file: FsHostFile;
  try {
    file = await FsHostFile.open(filename, true, true);
  } catch (e) {
    throw new InvalidArgumentError(`Could not create '${filename}': ${(e as Error).message}`, { cause: e });
  }
  try {
    // header, refcount table (entry 0 -> cluster 2), refcount block counting clusters 0-2
    const img0 = new Qcow2Image(file, h, { readOnly: false });
    await img0.writeHeader();
    const table = Buffer.alloc(clusterSize);
    table.writeBigUInt64BE(BigInt(2 * clusterSize), 0);
    await file.write(clusterSize, table);
    const block = Buffer.alloc(clusterSize);
    for (let c = 0; c < 3; c++) img0.refcounts.setEntry(block, c, 1);
    await file.write(2 * clusterSize, block);

    const img = new Qcow2Image(file, h, { readOnly: false });
    await img.load();
    await img.setSize(size);
    if (opts.backingFile !== undefined) {
      img.header.backingFile = opts.backingFile;
      img.header.backingFormat = opts.backingFormat ?? null;
    }
    if (opts.preallocation === 'metadata') await preallocateMetadata(img);
    await img.writeHeader();
    await img.writeback();
    await file.flush();
  } finally {
    await file.close();
  }
}

/** Allocates every L2 table and data cluster (L2 table first, then its clusters, like QEMU). */
async function preallocateMetadata(img: Qcow2Image): Promise<void> {
  const cs = img.clusterSize;
  const clusters = Math.ceil(img.header.size / cs);
  let end = 0;
  for (let c = 0; c < clusters; ) {
    const l1i = Math.floor(c / img.l2Entries);
    const n = Math.min(clusters - c, (l1i + 1) * img.l2Entries - c);
    const table = await img.getL2ForWrite(l1i);
    const host = await img.allocData(n);
    for (let k = 0; k < n; k++) writeL2Normal(table, (c + k) % img.l2Entries, host + k * cs);
    end = Math.max(end, host + n * cs);
    c += n;
    await img.maybeWriteback();
  }
  await img.writeback();
  if (img.file.length() < end) await img.file.truncate(end);
}
