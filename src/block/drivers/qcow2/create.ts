// Image creation, laid out exactly as QEMU 7.2's qcow2 creation (qemu-img create -f qcow2 and
// blockdev-create both run it) does: header cluster, refcount table (1 cluster), refcount
// block, then the L1 table allocated through the normal allocator (so that larger L1 tables
// pull in further refcount blocks the same way), then the header rewritten with its
// extensions and backing file name.
//
// formatQcow2 writes into any HostFile (a graph node for blockdev-create); createQcow2 is the
// host-file entry point (qemu-img create). Neither empties the file first: like QEMU, bytes
// past what the image writes stay as they were.

import { BlockError, InvalidArgumentError, STRERROR } from '../../../errors.js';
import { newHeader } from './header.js';
import { FsHostFile, type HostFile } from './host-file.js';
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

/** QEMU's BDRV_MAX_LENGTH: the largest request end it accepts */
const MAX_LENGTH = 9223372035781033984;
/** QEMU's limit on a backing file name in the header. */
const MAX_BACKING_NAME = 1023;

function log2(n: number): number {
  return Math.round(Math.log2(n));
}

function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && Number.isInteger(Math.log2(n));
}

/**
 * QEMU's option checks, in qcow2_co_create's order and words (the ones that come before any
 * I/O). Sizes are checked for alignment here; whether they fit is found when the image is
 * resized, as in QEMU.
 */
export function checkQcow2Options(opts: CreateQcow2Options): void {
  const v2 = (opts.compat ?? '1.1') === '0.10';
  // a negative size is a huge unsigned one for QEMU: the alignment check sees the same residue
  if (!Number.isInteger(opts.size) || ((opts.size % 512) + 512) % 512 !== 0) {
    throw new InvalidArgumentError('Image size must be a multiple of 512 bytes');
  }
  const clusterSize = opts.clusterSize ?? 65536;
  if (!isPowerOfTwo(clusterSize) || clusterSize < 512 || clusterSize > 2 * 1024 * 1024) {
    throw new InvalidArgumentError('Cluster size must be a power of two between 512 and 2048k');
  }
  if (opts.backingFile !== undefined && (opts.preallocation ?? 'off') !== 'off') {
    throw new InvalidArgumentError('Backing file and preallocation can only be used at the same time if extended_l2 is on');
  }
  if (opts.backingFormat !== undefined && opts.backingFile === undefined) {
    throw new InvalidArgumentError('Backing format cannot be used without backing file');
  }
  if (v2 && opts.lazyRefcounts) {
    throw new InvalidArgumentError('Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)');
  }
  const refcountBits = opts.refcountBits ?? 16;
  if (!isPowerOfTwo(refcountBits) || refcountBits > 64) {
    throw new InvalidArgumentError('Refcount width must be a power of two and may not exceed 64 bits');
  }
  if (v2 && refcountBits !== 16) {
    throw new InvalidArgumentError('Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)');
  }
}

/**
 * Writes a new qcow2 image into `file`. Checks the options first (InvalidArgumentError);
 * later failures carry QEMU's messages ("Could not resize image: ...").
 */
export async function formatQcow2(host: HostFile, opts: CreateQcow2Options): Promise<void> {
  checkQcow2Options(opts);
  // QEMU formats with BDRV_O_NO_FLUSH: the ordering flushes that keep a live image
  // consistent buy nothing while the image is being made; one flush at the end
  const file: HostFile = {
    read: (offset, length) => host.read(offset, length),
    write: (offset, data) => host.write(offset, data),
    flush: async () => {},
    length: () => host.length(),
    truncate: (length) => host.truncate(length),
  };
  const size = opts.size;
  const clusterSize = opts.clusterSize ?? 65536;
  const h = newHeader({
    version: (opts.compat ?? '1.1') === '0.10' ? 2 : 3,
    clusterBits: log2(clusterSize),
    size: 0,
    refcountOrder: log2(opts.refcountBits ?? 16),
    lazyRefcounts: opts.lazyRefcounts ?? false,
  });

  // header, refcount table (entry 0 -> cluster 2), refcount block counting clusters 0-2
  const img0 = new Qcow2Image(file, h, { readOnly: false });
  await stage('Could not write qcow2 header', () => img0.writeHeader());
  const table = Buffer.alloc(clusterSize);
  table.writeBigUInt64BE(BigInt(2 * clusterSize), 0);
  const block = Buffer.alloc(clusterSize);
  for (let c = 0; c < 3; c++) img0.refcounts.setEntry(block, c, 1);
  await stage('Could not write refcount table', async () => {
    await file.write(clusterSize, table);
    await file.write(2 * clusterSize, block);
  });

  const img = new Qcow2Image(file, h, { readOnly: false });
  await img.load();
  if (size < 0) throw new InvalidArgumentError('Could not resize image: Image size cannot be negative');
  if (size > MAX_LENGTH) throw new InvalidArgumentError(`Could not resize image: offset(${BigInt(size)}) exceeds maximum(${MAX_LENGTH})`);
  // the L1 table limit is QEMU's too (32 MiB), and so are the messages
  if (!Number.isSafeInteger(size)) throw new InvalidArgumentError('Could not resize image: Failed to grow the L1 table: File too large');
  await stage('Could not resize image: Failed to grow the L1 table', () => img.growL1(img.l1SizeFor(size)));
  img.header.size = size;
  await stage('Could not resize image: Failed to update the image size', () => img.writeHeader());
  if (opts.backingFile !== undefined) {
    if (Buffer.byteLength(opts.backingFile) > MAX_BACKING_NAME) {
      throw new InvalidArgumentError(`Could not assign backing file '${opts.backingFile}' with format '${opts.backingFormat ?? '(null)'}': Invalid argument`);
    }
    img.header.backingFile = opts.backingFile;
    img.header.backingFormat = opts.backingFormat ?? null;
  }
  if (opts.preallocation === 'metadata') await preallocateMetadata(img);
  await img.writeHeader();
  await img.writeback();
  await host.flush();
}

/** Runs one step of the creation; a data-path failure gets QEMU's "what: strerror" message. */
async function stage(what: string, step: () => Promise<void>): Promise<void> {
  try {
    await step();
  } catch (e) {
    if (e instanceof BlockError) throw new BlockError(e.code, `${what}: ${STRERROR[e.code]}`, { cause: e });
    throw e;
  }
}

/** qemu-img create -f qcow2: creates (or empties) `filename` and formats it. */
export async function createQcow2(filename: string, opts: CreateQcow2Options): Promise<void> {
  checkQcow2Options(opts);
  if (opts.backingFile !== undefined && Buffer.byteLength(opts.backingFile) > MAX_BACKING_NAME) {
    throw new InvalidArgumentError('Backing file name too long');
  }
  let file: FsHostFile;
  try {
    file = await FsHostFile.open(filename, true, true);
  } catch (e) {
    throw new InvalidArgumentError(`Could not create '${filename}': ${(e as Error).message}`, { cause: e });
  }
  try {
    await formatQcow2(file, opts);
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
