// Format driver "qcow2": QEMU's qcow2 (v2 = compat 0.10, v3 = compat 1.1) over a `file`
// child, with an optional `backing` child.
//
// Options (QEMU's names): file (required), backing (node-name, inline dict, or null for
// none; absent: the file named in the header, opened read-only), lazy-refcounts,
// cache-size, l2-cache-size, l2-cache-entry-size, refcount-cache-size,
// cache-clean-interval, pass-discard-request, pass-discard-snapshot, pass-discard-other,
// discard-no-unref, overlap-check (accepted; lockstep always runs QEMU's `cached` checks,
// overlap.ts), data-file and encrypt (refused). l2-cache-entry-size and
// the pass-discard-* options are accepted and validated but change nothing (tables are cached
// whole; freed clusters are not discarded in the file).
//
// Caps: requestAlignment 1, maxTransfer 32 MiB, no native FUA (the core flushes), native
// write-zeroes on v3 only (zero clusters), discard, block status, truncate (grow only).
//
// Not supported (refused at open, naming the feature): encryption, external data files,
// extended L2 entries, non-zlib compression, unknown incompatible features. Images with
// internal snapshots open, and make_empty takes the slow path on them.
//
// info(): qemu-img info's format-specific data (v3: compat, compression-type,
// lazy-refcounts, refcount-bits, corrupt, extended-l2; v2: compat, compression-type,
// refcount-bits) plus cluster-size, backing-filename, backing-filename-format, dirty-flag.

import { AsyncLocalStorage } from 'node:async_hooks';
import { stat } from 'node:fs/promises';
import { dirname, isAbsolute, join } from 'node:path';
import { makeCaps, type BlockDriver, type BlockStatus, type NodeCaps, type NodeImpl, type OpenContext } from '../../driver.js';
import { BlockError, InvalidArgumentError, errorMessage } from '../../../errors.js';
import type { BlockNode } from '../../node.js';
import type { OptionReader } from '../../options.js';
import { probeFormat } from '../../probe.js';
import {
  COMPAT_LAZY_REFCOUNTS,
  INCOMPAT_CORRUPT,
  INCOMPAT_DIRTY,
  checkSupported,
  readHeader,
  type Qcow2Header,
} from './header.js';
import { nodeHostFile, type HostFile } from './host-file.js';
import { Qcow2Image, Qcow2OpenError } from './image.js';
import { blockStatusAt, discardRange, readRange, readRangeInto, writeRange, zeroRange } from './io.js';
import { EmptySpare, makeEmpty } from './make-empty.js';
import { repairImage } from './check.js';
import { span } from '../../../util/trace.js';

/**
 * The files (device:inode) of the images whose header-named backing files are being opened
 * above this one: a backing file already among them is a loop (a -> b -> a), answered at
 * once instead of opening forever. Async-context state, so concurrent opens never mix.
 */
const openingChain = new AsyncLocalStorage<ReadonlySet<string>>();

async function fileIdentity(path: string): Promise<string | null> {
  try {
    const st = await stat(path);
    return `${st.dev}:${st.ino}`;
  } catch {
    return null;
  }
}

async function openHeaderBacking(ctx: OpenContext, h: Qcow2Header, file: BlockNode): Promise<BlockNode | null> {
  const name = h.backingFile;
  if (name === null) return null;
  if (/^[a-z0-9+]+:/i.test(name)) {
    throw new InvalidArgumentError(`Backing file '${name}' uses a protocol prefix lockstep does not support; pass 'backing' explicitly`);
  }
  const path = isAbsolute(name) ? name : join(dirname(file.filename), name);
  let fmt: string;
  try {
    fmt = h.backingFormat ?? (await probeFormat(path));
  } catch (e) {
    // QEMU's wording: the probe's "Could not open 'x': reason" under this layer's prefix
    throw new InvalidArgumentError(`Could not open backing file: ${errorMessage(e)}`, { cause: e });
  }
  if (fmt !== 'raw' && fmt !== 'qcow2') throw new InvalidArgumentError(`Unsupported backing file format '${fmt}' for '${path}'`);
  const above = new Set(openingChain.getStore() ?? []);
  const self = await fileIdentity(file.filename);
  if (self !== null) above.add(self);
  const target = await fileIdentity(path);
  if (target !== null && above.has(target)) throw new InvalidArgumentError(`Backing file '${path}' creates an infinite loop.`);
  try {
    return await openingChain.run(above, () =>
      ctx.openChild('backing', { driver: fmt, file: { driver: 'file', filename: path } }, { readOnly: true }),
    );
  } catch (e) {
    if (e instanceof InvalidArgumentError && /^Backing file '.*' creates an infinite loop\.$/.test(e.message)) throw e;
    // QEMU's wording, once per layer
    throw new InvalidArgumentError(`Could not open backing file: ${errorMessage(e)}`, { cause: e });
  }
}

function readCacheOptions(o: OptionReader, clusterSize: number): { l2?: number; rc?: number } {
  const total = o.size('cache-size');
  let l2 = o.size('l2-cache-size');
  let rc = o.size('refcount-cache-size');
  const entry = o.size('l2-cache-entry-size');
  if (entry !== undefined && (entry < 512 || entry > clusterSize || (entry & (entry - 1)) !== 0)) {
    throw new InvalidArgumentError(`L2 cache entry size must be a power of two between 512 and the cluster size (${clusterSize})`);
  }
  if (total !== undefined) {
    if (l2 !== undefined && rc !== undefined && l2 + rc !== total) {
      throw new InvalidArgumentError(`l2-cache-size (${l2}) + refcount-cache-size (${rc}) may not exceed cache-size (${total})`);
    }
    if (l2 === undefined && rc === undefined) {
      rc = Math.max(4 * clusterSize, Math.floor(total / 4));
      l2 = Math.max(2 * clusterSize, total - rc);
    } else if (l2 === undefined) l2 = Math.max(2 * clusterSize, total - rc!);
    else if (rc === undefined) rc = Math.max(4 * clusterSize, total - l2);
  }
  const out: { l2?: number; rc?: number } = {};
  if (l2 !== undefined) out.l2 = l2;
  if (rc !== undefined) out.rc = rc;
  return out;
}

/**
 * Reads and checks the header, repairs a dirty image opened read-write, and loads the image
 * (its tables, with corruption reported on the graph as QEMU reports it).
 */
async function loadImage(ctx: OpenContext, o: OptionReader, file: BlockNode, host: HostFile, lazyOpt: boolean | undefined): Promise<Qcow2Image> {
  const readOnly = ctx.readOnly;
  let h: Qcow2Header;
  try {
    h = await readHeader(host);
  } catch (e) {
    throw new InvalidArgumentError(`Could not open '${file.filename}': ${errorMessage(e)}`, { cause: e });
  }
  checkSupported(h, readOnly, file.filename);
  const cacheOpts = readCacheOptions(o, 2 ** h.clusterBits);
  if (lazyOpt && h.version < 3) {
    throw new InvalidArgumentError('Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level');
  }
  if (!readOnly && h.incompatible & INCOMPAT_DIRTY) {
    // refcounts may be stale after a crash with lazy_refcounts: rebuild them (QEMU does)
    await repairImage(host, h);
    h = await readHeader(host);
  }
  const img = new Qcow2Image(host, h, {
    readOnly,
    lazyRefcountTable: readOnly,
    lazyRefcounts: lazyOpt ?? (h.compatible & COMPAT_LAZY_REFCOUNTS) !== 0n,
    ...(cacheOpts.l2 !== undefined ? { l2CacheSize: cacheOpts.l2 } : {}),
    ...(cacheOpts.rc !== undefined ? { refcountCacheSize: cacheOpts.rc } : {}),
  });
  img.pacer = ctx.graph.pacer;
  img.onCorruption = (msg, offset, size, fatal) => {
    // QEMU's stderr line and BLOCK_IMAGE_CORRUPTED event
    ctx.graph.emit(
      'error-log',
      fatal
        ? `qcow2: Marking image as corrupt: ${msg}; further corruption events will be suppressed`
        : `qcow2: Image is corrupt: ${msg}; further non-fatal corruption events will be suppressed`,
    );
    ctx.graph.emit('event', 'BLOCK_IMAGE_CORRUPTED', { device: '', 'node-name': ctx.node.name, msg, offset, size, fatal });
  };
  try {
    await img.load();
  } catch (e) {
    if (e instanceof Qcow2OpenError) throw e;
    throw new InvalidArgumentError(`Could not open '${file.filename}': ${errorMessage(e)}`, { cause: e });
  }
  if (!readOnly && h.autoclear !== 0n) {
    // lockstep keeps no bitmaps: their data is inconsistent from the first write on
    img.header.autoclear = 0n;
    await img.writeHeader();
    await host.flush();
  }
  return img;
}

export const qcow2Driver: BlockDriver = {
  name: 'qcow2',
  kind: 'format',
  supportsBacking: true,
  supportsMakeEmpty: true,
  async open(ctx, o): Promise<NodeImpl> {
    const fileOpt = o.raw('file');
    const hasBacking = o.has('backing');
    const backingOpt = o.raw('backing');
    const lazyOpt = o.bool('lazy-refcounts');
    o.bool('pass-discard-request');
    o.bool('pass-discard-snapshot');
    o.bool('pass-discard-other');
    o.bool('discard-no-unref');
    o.uint('cache-clean-interval');
    o.raw('overlap-check');
    if (o.has('data-file')) throw new InvalidArgumentError(`Parameter 'data-file': external data files are not supported by lockstep`);
    if (o.has('encrypt')) throw new InvalidArgumentError(`Parameter 'encrypt': encrypted qcow2 images are not supported by lockstep`);
    const file = (await ctx.openChild('file', fileOpt, { required: true }))!;
    const host = nodeHostFile(file);
    const img = await loadImage(ctx, o, file, host, lazyOpt);

    let backing: BlockNode | null;
    if (!hasBacking) backing = await openHeaderBacking(ctx, img.header, file);
    else backing = await ctx.openChild('backing', backingOpt, { readOnly: true, errorPrefix: 'Could not open backing file: ' });
    if (backing) {
      // The backing edge can be re-pointed after open (an intermediate commit makes it point
      // at the base), so the current child is read at request time.
      const node = ctx.node;
      const current = (): BlockNode => node.backing ?? backing;
      img.backing = {
        length: () => current().getLength(),
        read: (off, len) => current().read(off, len),
        readInto: (off, buf) => current().readInto(off, buf),
      };
    }
    return new Qcow2Node(img, host, file, ctx.readOnly);
  },
};

/** The state of an open qcow2 node: the image, its file, and the spare make_empty swaps in. */
class Qcow2Node implements NodeImpl {
  readonly caps: NodeCaps;
  readonly clusterSize: number;
  // the empty image make_empty swaps in (make-empty.ts), prepared after each make_empty
  private readonly spare: EmptySpare;

  constructor(
    private readonly img: Qcow2Image,
    private readonly host: HostFile,
    private readonly file: BlockNode,
    private readOnly: boolean,
  ) {
    this.spare = new EmptySpare(host);
    this.clusterSize = img.clusterSize;
    this.caps = makeCaps({
      requestAlignment: 1,
      fua: false,
      writeZeroes: img.header.version === 3,
      discard: true,
      blockStatus: true,
      truncate: true,
    });
  }

  get filename(): string {
    return this.file.filename;
  }

  getLength(): number {
    return this.img.header.size;
  }

  read(offset: number, length: number): Promise<Buffer> {
    return readRange(this.img, offset, length);
  }

  readInto(offset: number, buf: Buffer): Promise<void> {
    return readRangeInto(this.img, offset, buf);
  }

  write(offset: number, data: Buffer): Promise<void> {
    return writeRange(this.img, offset, data);
  }

  writeZeroes(offset: number, length: number): Promise<void> {
    return zeroRange(this.img, offset, length);
  }

  discard(offset: number, length: number): Promise<void> {
    return discardRange(this.img, offset, length, false);
  }

  async flush(): Promise<void> {
    const { img } = this;
    if (img.readOnly) return;
    await img.settleCorruptBit();
    // QEMU drops a node it marked corrupt: flushing it does nothing and succeeds
    if (img.fatallyCorrupt) return;
    // The writeback holds the mutex (every allocating write waits for it) and syncs the file
    // between its steps: that sync would write back all the data written since the last
    // flush, mutex held (issue 18: 10-30 ms once a second under 4 KiB random writes, when
    // the pair's dirty logs flush their disks). Synced first without the mutex, those syncs
    // find only the metadata and what was written meanwhile. An extra sync orders nothing
    // differently.
    if (img.writebackSyncs()) await span('q2.flush.pre', -1, this.host.flush());
    await span('q2.flush.writeback', -1, img.mutex.run(() => img.writeback()));
    await this.host.flush();
  }

  blockStatus(offset: number, length: number): Promise<BlockStatus> {
    return blockStatusAt(this.img, offset, length, this.file);
  }

  async truncate(length: number): Promise<void> {
    const { img } = this;
    img.checkWritable();
    if (length < img.header.size) throw new BlockError('ENOTSUP', 'qcow2: shrinking images is not supported by lockstep');
    if (length % 512 !== 0) throw new BlockError('EINVAL', 'qcow2: the image size must be a multiple of 512 bytes');
    await img.mutex.run(() => img.setSize(length));
  }

  async makeEmpty(): Promise<void> {
    await makeEmpty(this.img, this.spare);
  }

  async settle(): Promise<void> {
    await this.spare.idle();
    await this.img.settleTruncate();
  }

  /** Writes back the caches, flushes and clears the dirty bit; the caller holds the mutex. */
  private async writebackClean(): Promise<void> {
    const { img } = this;
    await img.settleTruncate();
    await img.writeback();
    await this.host.flush();
    await img.markClean();
  }

  async reopen(ro: boolean): Promise<void> {
    const { img, file } = this;
    if (ro === this.readOnly) return;
    if (ro) {
      await this.spare.discard();
      await img.mutex.run(() => this.writebackClean());
      await file.setReadOnly(true);
    } else {
      checkSupported(img.header, false, file.filename);
      // writes and their overlap checks need the refcount table a read-only open left
      await img.mutex.run(() => img.loadRefcountTable());
      await file.setReadOnly(false);
    }
    this.readOnly = ro;
    img.readOnly = ro;
  }

  async close(): Promise<void> {
    const { img } = this;
    await this.spare.close();
    await img.settleCorruptBit();
    if (img.readOnly || img.fatallyCorrupt) return;
    await img.mutex.run(() => this.writebackClean());
  }

  info(): Record<string, unknown> {
    const { img } = this;
    const hh = img.header;
    // the format-specific fields exactly as qemu-img info shows them (v2 has fewer)
    const specific: Record<string, unknown> =
      hh.version === 3
        ? {
            compat: '1.1',
            'compression-type': 'zlib',
            'lazy-refcounts': (hh.compatible & COMPAT_LAZY_REFCOUNTS) !== 0n,
            'refcount-bits': 2 ** hh.refcountOrder,
            corrupt: (hh.incompatible & INCOMPAT_CORRUPT) !== 0n || img.corruptReason !== null,
            'extended-l2': false,
          }
        : { compat: '0.10', 'compression-type': 'zlib', 'refcount-bits': 16 };
    return {
      ...specific,
      'cluster-size': img.clusterSize,
      'backing-filename': hh.backingFile,
      'backing-filename-format': hh.backingFormat,
      'dirty-flag': (hh.incompatible & INCOMPAT_DIRTY) !== 0n,
    };
  }
}
