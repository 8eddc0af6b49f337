// Filter driver "copy-before-write": before a write, zero write or discard reaches a
// cluster of `file` whose bit is set in the copy bitmap, the cluster's old content is copied
// to `target` at the same offset and the bit cleared (backup sync=none, fleecing,
// replication's hidden disk). Reads, flushes and block status pass through.
//
// Options (QEMU's names): file (BlockdevRef, the filtered node), target (BlockdevRef),
// on-cbw-error ('break-guest-write' only: a failed copy fails the guest's write and leaves
// `file` unchanged). Not supported: bitmap, cbw-timeout, on-cbw-error=break-snapshot.
// lockstep's own: x-copy-unit (the cluster size below; replication passes it down).
//
// Cluster size (the copy unit): max(64 KiB, the target's cluster size (its impl's
// clusterSize)), as QEMU's; x-copy-unit sets it (a power of two, 4 KiB to 4 MiB), but never
// below the target's cluster size: a copy of part of a qcow2 cluster makes the target fill
// the rest from its backing, which for replication's hidden disk is the source itself, where
// newer writes may already have landed. The last cluster may be shorter. The bitmap starts
// all-set ("nothing copied yet").
//
// Atomicity: a writer waits for any copy in flight on its clusters; when the source is in
// the target's backing chain (fleecing), a copy also waits for the target's overlapping
// in-flight reads before the source may change, so a reader through the target never sees
// a post-checkpoint write. Reads never wait for copies (they could be the very readers a
// copy is waiting for).
//
// query output: info() gives { target, 'cluster-size', 'dirty-clusters', 'copied-bytes' }, as
// QEMU's names go: 'dirty-clusters' are the clusters NOT yet copied (the bitmap's set bits).
// query-replication's 'dirty-clusters' counts the opposite, the clusters copied into the
// hidden disk; both names stay on the wire, the code says uncopied / copied.

import { cbwChildPerms } from '../permissions.js';
import { makeCaps, type BlockDriver, type NodeImpl } from '../driver.js';
import { InvalidArgumentError, StateError } from '../../errors.js';
import type { BlockNode } from '../node.js';
import { Bitmap } from '../../util/bitmap.js';
import { BlockCopy, DEFAULT_CLUSTER_SIZE, MAX_CHUNK } from '../block-copy.js';
import { span } from '../../util/trace.js';

/** The largest piece of a request copied and written at once: a few copy chunks. */
export const PIECE = 16 * MAX_CHUNK;

/** The bounds of x-copy-unit. */
export const MIN_COPY_UNIT = 4 * 1024;
export const MAX_COPY_UNIT = MAX_CHUNK;

/** Why `unit` cannot be a copy unit at all (not a power of two in range), or null. */
export function badCopyUnit(unit: number): string | null {
  if (unit < MIN_COPY_UNIT || unit > MAX_COPY_UNIT || (unit & (unit - 1)) !== 0) {
    return `copy unit ${unit} must be a power of two from ${MIN_COPY_UNIT} to ${MAX_COPY_UNIT} bytes`;
  }
  return null;
}

/**
 * Checks a copy unit asked for against a target: an InvalidArgumentError (EINVAL) when it is
 * no power of two in range or smaller than the target's cluster size (the data rule above).
 */
export function checkCopyUnit(unit: number, target: BlockNode): void {
  const bad = badCopyUnit(unit);
  if (bad) throw new InvalidArgumentError(bad);
  const cluster = target.impl.clusterSize ?? 0;
  if (unit < cluster) {
    throw new InvalidArgumentError(
      `copy unit ${unit} is smaller than the cluster size ${cluster} of target '${target.name}': ` +
        'a partial-cluster copy would fill the rest of the cluster from the target\'s backing',
    );
  }
}

/** The cluster size a copy into `target` uses: `unit` when asked for (checked), else
 *  max(64 KiB, target's cluster size). */
export function copyClusterSize(target: BlockNode, unit?: number): number {
  if (unit !== undefined) {
    checkCopyUnit(unit, target);
    return unit;
  }
  const n = target.impl.clusterSize ?? 0;
  return n > DEFAULT_CLUSTER_SIZE ? n : DEFAULT_CLUSTER_SIZE;
}

/** The per-node state of a copy-before-write filter, shared with its backup job. */
export class CopyBeforeWrite {
  readonly bitmap: Bitmap;
  readonly copy: BlockCopy;
  /** false once the job ended: writes pass straight through */
  active = true;
  /**
   * Others may write the source under the filter (lockstep's replication only: its failover
   * commits into the secondary disk while the filter is still above it); QEMU never lets
   * them, and neither does a backup a user starts (its target could be the source itself).
   */
  shareSourceWrite = false;

  constructor(
    /** the filter node itself: its request tracker is what quiesce() holds */
    private readonly node: BlockNode,
    readonly source: BlockNode,
    readonly target: BlockNode,
    fleecing: boolean,
    unit?: number,
  ) {
    this.bitmap = new Bitmap(source.getLength(), copyClusterSize(target, unit));
    this.bitmap.setAll();
    this.copy = new BlockCopy({ source, target, bitmap: this.bitmap, mode: 'snapshot', fleecing });
  }

  get clusterSize(): number {
    return this.bitmap.granularity;
  }

  /**
   * Runs a modifying request after its clusters' old content has been copied, in pieces of
   * at most PIECE bytes: each piece's clusters are copied, then the piece is written, and
   * the event loop gets its turn between pieces. A discard of the whole disk thus never
   * holds the loop, nor the memory of its whole old content.
   */
  async guarded(offset: number, length: number, op: (offset: number, length: number) => Promise<void>, zeroing = false): Promise<void> {
    const end = offset + length;
    for (let pos = offset; pos < end || length === 0; ) {
      // pieces end at multiples of PIECE (of every cluster size): a discard cut in two
      // must not leave a cluster at the cut undiscarded
      const n = Math.min(PIECE - (pos % PIECE), end - pos);
      if (pos > offset) await this.source.graph.pacer.pace();
      if (this.active && n > 0) await span('cbw.copy', pos, this.copy.copyBeforeWrite(pos, n, zeroing));
      await op(pos, n);
      if (length === 0) break;
      pos += n;
    }
  }

  /**
   * Holds the filter node's requests (every write, zero write and discard through it is a
   * tracked request, issued before the hold or held by it), waits for those in flight (with
   * their copies) and for background copies, runs `fn`, releases.
   */
  quiesce<T>(fn: () => T | Promise<T>): Promise<T> {
    return this.node.tracker.holding(async () => {
      await this.copy.drain();
      return await fn();
    });
  }

  /**
   * Replication's checkpoint: "nothing copied since now", with nothing in flight. `during`
   * runs after the reset with new writes still held (emptying the overlays there keeps a
   * new write's copy from landing before the hidden disk is emptied).
   */
  async checkpoint(during?: () => Promise<void>): Promise<void> {
    await this.quiesce(async () => {
      this.bitmap.setAll();
      if (during) await during();
    });
  }
}

export interface CopyBeforeWriteImpl extends NodeImpl {
  readonly cbw: CopyBeforeWrite;
}

/** The filter state of a copy-before-write node. */
export function getCopyBeforeWrite(node: BlockNode): CopyBeforeWrite {
  if (node.driver !== copyBeforeWriteDriver) throw new StateError(`Node '${node.name}' is not a copy-before-write filter`);
  return (node.impl as CopyBeforeWriteImpl).cbw;
}

export const copyBeforeWriteDriver: BlockDriver = {
  name: 'copy-before-write',
  kind: 'filter',
  childPerms: (node, role, parent) =>
    cbwChildPerms(role, parent, node.parents.size > 0, node.isOpen && (node.impl as CopyBeforeWriteImpl).cbw.shareSourceWrite),
  async open(ctx, o): Promise<NodeImpl> {
    const fileOpt = o.raw('file');
    const targetOpt = o.raw('target');
    const onErr = o.enumOf('on-cbw-error', ['break-guest-write', 'break-snapshot']);
    if (onErr === 'break-snapshot') throw new InvalidArgumentError(`Parameter 'on-cbw-error' value 'break-snapshot' is not supported`);
    if (o.has('bitmap')) throw new InvalidArgumentError(`Parameter 'bitmap' is not supported by copy-before-write`);
    if (o.has('cbw-timeout')) throw new InvalidArgumentError(`Parameter 'cbw-timeout' is not supported by copy-before-write`);
    const unit = o.size('x-copy-unit');
    o.done();
    // before the children open: a bad value leaves nothing behind
    const bad = unit === undefined ? null : badCopyUnit(unit);
    if (bad) throw new InvalidArgumentError(`Parameter 'x-copy-unit': ${bad}`);
    const file = (await ctx.openChild('file', fileOpt, { required: true }))!;
    const target = (await ctx.openChild('target', targetOpt, { required: true }))!;
    if (target.getLength() < file.getLength()) {
      throw new InvalidArgumentError(
        `Source and target image have different sizes (${file.getLength()} and ${target.getLength()} bytes)`,
      );
    }
    // Fleecing: the target reads through to the source, so copies must wait for its readers.
    const fleecing = ctx.graph.reaches(target, file);
    const cbw = new CopyBeforeWrite(ctx.node, file, target, fleecing, unit);
    const impl: CopyBeforeWriteImpl = {
      cbw,
      caps: makeCaps({
        // byte granular: the source aligns; a serialising RMW here could wait on a reader
        // that a copy is waiting for
        requestAlignment: 1,
        fua: true,
        writeZeroes: true,
        discard: true,
        filter: true,
        growable: file.caps.growable ?? false,
      }),
      get filename() {
        return file.filename;
      },
      getLength: () => file.getLength(),
      read: (offset, length) => file.read(offset, length),
      readInto: (offset, buf) => file.readInto(offset, buf),
      write: (offset, data, flags) =>
        cbw.guarded(offset, data.length, (o, n) =>
          file.write(o, n === data.length ? data : data.subarray(o - offset, o - offset + n), flags),
        ),
      // zeroes over zeroes need no copy; a discard is not one (a device may show old or
      // other data where it discarded, so its clusters are copied as for a write)
      writeZeroes: (offset, length, flags) => cbw.guarded(offset, length, (o, n) => file.writeZeroes(o, n, flags), true),
      discard: (offset, length) => cbw.guarded(offset, length, (o, n) => file.discard(o, n)),
      flush: () => file.flush(),
      info: () => ({
        target: target.name,
        'cluster-size': cbw.clusterSize,
        'dirty-clusters': cbw.bitmap.count,
        'copied-bytes': cbw.copy.copiedBytes,
      }),
      close: async () => {
        cbw.active = false;
      },
    };
    return impl;
  },
};
