// The permission model on graph edges, in the manner of QEMU 7.2's (block.c): every edge from
// a parent (a node, an export or device, a job) to a child declares the permissions it takes
// on the child (`perm`) and the ones it lets the child's other parents take (`shared`). A
// node's parents must agree pairwise: what one takes, every other shares. A node's own
// needs on its children follow from what its parents take and share (the `childPerms` rules
// below, one per kind of edge), so a writer at the top becomes a writer of the image file at
// the bottom, where the file driver turns the cumulative permissions into QEMU's lock bytes.
//
// This file is the model alone (bits, names, the rules, the conflict check and its message);
// BlockGraph applies it whenever an edge, a backend, a job or a read-only flag changes.

import { InvalidArgumentError } from '../errors.js';

/** QEMU's BLK_PERM_* bits (7.2: GRAPH_MOD is gone), in lock-byte order. */
export const PERM = { CONSISTENT_READ: 1, WRITE: 2, WRITE_UNCHANGED: 4, RESIZE: 8 } as const;
export const PERM_COUNT = 4;
export const PERM_ALL = (1 << PERM_COUNT) - 1;
const PERM_NAMES = ['consistent read', 'write', 'write unchanged', 'resize'] as const;

/** What a user takes on a node and what it lets others take. */
export interface Perms {
  perm: number;
  shared: number;
}

/** QEMU's bdrv_perm_names: "write, resize". */
export function permNames(bits: number): string {
  const out: string[] = [];
  for (let i = 0; i < PERM_COUNT; i++) if (bits & (1 << i)) out.push(PERM_NAMES[i]!);
  return out.join(', ');
}

/** A permission conflict: QMP GenericError with QEMU's text. */
export class PermissionError extends InvalidArgumentError {
  override name = 'PermissionError';
}

/** One parent edge of a node, as the conflict check sees it. */
export interface PermUser {
  perm: number;
  shared: number;
  /** the child's role in this edge ('root', 'file', 'backing', 'target', ...) */
  role: string;
  /** QEMU's get_parent_desc: "node 'x'", "block device 'x'", "an unnamed block device" */
  desc: string;
}

/**
 * QEMU's bdrv_parent_perms_conflict: every ordered pair (a, b) of parents, in the order
 * given (QEMU lists a node's parents newest first), and the first pair where `a` does not
 * share what `b` takes is refused.
 */
export function findParentConflict(nodeName: string, parents: readonly PermUser[]): PermissionError | null {
  for (const a of parents) {
    for (const b of parents) {
      if (a === b) continue;
      const missing = b.perm & ~a.shared;
      if (missing === 0) continue;
      return new PermissionError(
        `Permission conflict on node '${nodeName}': permissions '${permNames(missing)}' are both required by ` +
          `${b.desc} (uses node '${nodeName}' as '${b.role}' child) and unshared by ` +
          `${a.desc} (uses node '${nodeName}' as '${a.role}' child).`,
      );
    }
  }
  return null;
}

/** What all parents together take and share (QEMU's bdrv_get_cumulative_perm). */
export function cumulative(parents: Iterable<Perms>): Perms {
  let perm = 0;
  let shared = PERM_ALL;
  for (const p of parents) {
    perm |= p.perm;
    shared &= p.shared;
  }
  return { perm, shared };
}

// ---- what a node takes on its children -------------------------------------------------

const PASSTHROUGH = PERM_ALL;

/** A filter's child (and raw without offset/size): the parents' needs pass through. */
export function filterChildPerms(parent: Perms): Perms {
  return { perm: parent.perm & PASSTHROUGH, shared: parent.shared & PASSTHROUGH };
}

/**
 * A format's `file` child (metadata and data): a writable format may rewrite metadata and
 * grow the file even when nobody writes through it, it always reads its metadata, and it
 * never lets others write or resize the file under it (QEMU's default_perms_for_storage).
 */
export function storageChildPerms(parent: Perms, writable: boolean, noIo = false): Perms {
  let { perm, shared } = filterChildPerms(parent);
  if (writable) perm |= PERM.WRITE | PERM.RESIZE;
  // opened for its metadata only (qemu-img info: BDRV_O_NO_IO), a format reads no data
  if (!noIo) perm |= PERM.CONSISTENT_READ;
  shared &= ~(PERM.WRITE | PERM.RESIZE);
  if (perm & PERM.WRITE_UNCHANGED) perm |= PERM.WRITE;
  if (perm & PERM.WRITE) perm |= PERM.RESIZE;
  return { perm, shared };
}

/**
 * A format's `backing` child: only read, and then consistently if the parent needs it;
 * others may write it only if the parent's users accept changing data (default_perms_for_cow).
 */
export function cowChildPerms(parent: Perms): Perms {
  const perm = parent.perm & PERM.CONSISTENT_READ;
  let shared = parent.shared & PERM.WRITE ? PERM.WRITE | PERM.RESIZE : 0;
  shared |= PERM.CONSISTENT_READ | PERM.WRITE_UNCHANGED;
  return { perm, shared };
}

/** raw with offset or size: storage of data only, WRITE and RESIZE only when asked for. */
export function rawWindowChildPerms(parent: Perms): Perms {
  const p = filterChildPerms(parent);
  const shared = p.shared & ~PERM.RESIZE;
  const perm = (p.perm & ~(PERM.WRITE | PERM.RESIZE)) | (parent.perm & (PERM.WRITE | PERM.RESIZE));
  return { perm, shared };
}

/**
 * quorum's children: never shared for resize, or the children would differ. QEMU does not
 * share write either; lockstep does (a deliberate difference): a pair's replication node is
 * also driven directly by its registry and tests while it is a quorum child, and the quorum's
 * ordered writes already keep the children in one order.
 */
export function quorumChildPerms(parent: Perms, rewriteCorrupted: boolean): Perms {
  let perm = parent.perm & PASSTHROUGH;
  if (rewriteCorrupted) perm |= PERM.WRITE;
  return { perm, shared: parent.shared & (PERM.CONSISTENT_READ | PERM.WRITE_UNCHANGED | PERM.WRITE) };
}

/**
 * replication's children: it reads its `file` and writes every child when writable whatever
 * its parents do (the secondary's checkpoints and failover write underneath them), reads the
 * hidden and secondary disks it holds only for that, and lets the others read and write (the
 * secondary disk is written by the NBD export while replication runs).
 */
export function replicationChildPerms(writable: boolean, primaryChild = true): Perms {
  return {
    perm: (primaryChild ? PERM.CONSISTENT_READ : 0) | (writable ? PERM.WRITE : 0),
    shared: PERM.CONSISTENT_READ | PERM.WRITE | PERM.WRITE_UNCHANGED,
  };
}

/**
 * copy-before-write's children: the target is written and may be written by others (a
 * fleecing reader's overlay), never resized; the source passes its parents' needs through,
 * plus a consistent read when they write (the old data is copied first), and is never
 * written or resized behind the filter's back. `shareWrite` lets others write the source
 * (a deliberate difference for lockstep's replication only: its failover commits into the
 * secondary disk while the filter is still above it).
 */
export function cbwChildPerms(role: string, parent: Perms, hasParents: boolean, shareWrite = false): Perms {
  if (role !== 'file') return { perm: PERM.WRITE, shared: PERM_ALL & ~PERM.RESIZE };
  const p = filterChildPerms(parent);
  if (hasParents) {
    if (parent.perm & PERM.WRITE) p.perm |= PERM.CONSISTENT_READ;
    p.shared &= shareWrite ? ~PERM.RESIZE : ~(PERM.RESIZE | PERM.WRITE);
  }
  return p;
}

/**
 * commit_top (active commit's filter): no consistent read of the top (the chain above the
 * base is inconsistent during the commit) and writes shared, or the job would block itself
 * at the base.
 */
export function commitTopChildPerms(parent: Perms): Perms {
  const p = filterChildPerms(parent);
  return { perm: p.perm & ~PERM.CONSISTENT_READ, shared: p.shared | PERM.WRITE };
}

/** The default rule of a driver kind for a child role. */
export function defaultChildPerms(
  kind: 'protocol' | 'format' | 'filter' | 'multi',
  role: string,
  parent: Perms,
  writable: boolean,
  noIo = false,
): Perms {
  if (role === 'backing') return cowChildPerms(parent);
  if (kind === 'filter') return filterChildPerms(parent);
  return storageChildPerms(parent, writable, noIo);
}

// ---- what users above the graph take -----------------------------------------------------

/** An export or device (QEMU's blk_exp_add: shares everything). */
export function exportPerms(writable: boolean): Perms {
  return { perm: PERM.CONSISTENT_READ | (writable ? PERM.WRITE : 0), shared: PERM_ALL };
}

/** An NBD export: as any export, but nobody may resize the node while it is served. */
export function nbdExportPerms(writable: boolean): Perms {
  return { perm: exportPerms(writable).perm, shared: PERM_ALL & ~PERM.RESIZE };
}

/**
 * A tool's image (qemu-img, qemu-io: blk_new_open): consistent read and write when writable,
 * nothing with `noIo` (qemu-img info), everything shared: what keeps two tools off one qcow2
 * is the format's own rule on its file, not the tool's handle (a raw image takes two writers
 * in QEMU too).
 */
export function toolPerms(writable: boolean, noIo = false): Perms {
  return { perm: noIo ? 0 : PERM.CONSISTENT_READ | (writable ? PERM.WRITE : 0), shared: PERM_ALL };
}

/** mirror's job handle on its filter: reads the source, lets the guest go on writing. */
export const MIRROR_SOURCE_PERMS: Perms = {
  perm: PERM.CONSISTENT_READ,
  shared: PERM.CONSISTENT_READ | PERM.WRITE_UNCHANGED | PERM.WRITE,
};
/** mirror's target: written, and nobody else may read or write it until the job ends. */
export const MIRROR_TARGET_PERMS: Perms = { perm: PERM.WRITE, shared: PERM.WRITE_UNCHANGED };
/** active commit's base: it is the backing of nodes in use, so everything but resize. */
export function activeCommitBasePerms(resize: boolean): Perms {
  return {
    perm: PERM.WRITE | (resize ? PERM.RESIZE : 0),
    shared: PERM.WRITE_UNCHANGED | PERM.CONSISTENT_READ | PERM.WRITE,
  };
}
/** commit's base (not active): read, written and maybe resized; readers alongside only. */
export const COMMIT_BASE_PERMS: Perms = {
  perm: PERM.CONSISTENT_READ | PERM.WRITE | PERM.RESIZE,
  shared: PERM.CONSISTENT_READ | PERM.WRITE_UNCHANGED,
};
/** a job's hold on a node it only watches (QEMU's block_job_add_bdrv(..., 0, ALL)) */
export const WATCH_PERMS: Perms = { perm: 0, shared: PERM_ALL };
/** commit's intermediate nodes: they disappear at the end, so no reader may rely on them */
export const INTERMEDIATE_PERMS: Perms = { perm: 0, shared: PERM.WRITE | PERM.WRITE_UNCHANGED };
/** blockdev-create's target (QEMU's create: WRITE | RESIZE, sharing all) */
export const CREATE_TARGET_PERMS: Perms = { perm: PERM.WRITE | PERM.RESIZE, shared: PERM_ALL };
/** block_resize's temporary handle */
export const RESIZE_PERMS: Perms = { perm: PERM.RESIZE, shared: PERM_ALL };
/** the resync job's source: read while its guest goes on writing */
export const RESYNC_SOURCE_PERMS: Perms = { perm: PERM.CONSISTENT_READ, shared: PERM_ALL & ~PERM.RESIZE };
/** the resync job's target: written, by replication too during a live resync */
export const RESYNC_TARGET_PERMS: Perms = { perm: PERM.WRITE, shared: PERM_ALL & ~PERM.RESIZE };
