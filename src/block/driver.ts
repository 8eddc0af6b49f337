// The driver contract. A driver is a plain object; `open()` returns the node's
// implementation (NodeImpl) and declares its capabilities once, in `caps`.
//
// Guarantees the core (block/node.ts) gives every NodeImpl:
// - offset and length of read/write/writeZeroes/discard are multiples of
//   caps.requestAlignment, and length <= caps.maxTransfer for read/write;
// - requests never extend past getLength(), unless caps.growable;
// - write's `data` is only valid until the returned promise settles: copy it to keep it;
// - writeZeroes is called only when caps.writeZeroes is true (the core emulates it
//   otherwise), discard only when caps.discard is true, and `fua` only when caps.fua.
// A read resolves with a Buffer the caller owns, fully written (zero-filled holes).
// readInto (optional) fills the caller's buffer with exactly the bytes read would resolve
// with: every byte of it is written (holes as zeroes), nothing is kept after it settles.

import type { BlockNode } from './node.js';
import type { BlockGraph } from './graph.js';
import type { OptionReader } from './options.js';
import type { Perms } from './permissions.js';

/** A permission change a node prepared (its image locks): made final or undone. */
export interface PermChange {
  commit(): void;
  abort(): void;
}

export type DriverKind = 'protocol' | 'format' | 'filter' | 'multi';

export interface WriteFlags {
  /** force unit access: the data is stable when the write completes */
  fua?: boolean;
}

export interface ZeroFlags extends WriteFlags {
  /** the range may be deallocated (a hole) as long as it reads back as zeroes */
  mayUnmap?: boolean;
  /** fail with ENOTSUP instead of writing zero buffers when no fast path exists */
  noFallback?: boolean;
}

/** One run of same-status bytes, starting at the queried offset. */
export interface BlockStatus {
  /** > 0: bytes from the queried offset that share this status */
  length: number;
  /**
   * This layer defines these bytes. For a format with backing, false means the read falls
   * through to the backing chain. Protocol layers are always allocated.
   */
  allocated: boolean;
  /** the bytes read as zeroes */
  zero: boolean;
  /** the bytes are stored as data (not a hole) */
  data: boolean;
  /** where the bytes live in `file` (qemu-img map's "offset"), if known */
  hostOffset?: number;
  /** the node holding the data at hostOffset */
  file?: BlockNode;
}

export interface NodeCaps {
  /** power of two; every request is aligned to it */
  requestAlignment: number;
  /** upper bound of one read/write request, a multiple of requestAlignment */
  maxTransfer: number;
  /** native FUA writes; otherwise the core flushes after a FUA write */
  fua: boolean;
  /** native writeZeroes */
  writeZeroes: boolean;
  /** native discard (a no-op discard is fine: discard is advisory) */
  discard: boolean;
  /** the driver answers blockStatus; otherwise everything is allocated data */
  blockStatus: boolean;
  /** the driver implements truncate */
  truncate: boolean;
  /** the node is a filter whose data is its `file` child's (block status passes through) */
  filter?: boolean;
  /**
   * Writes past the end grow the node, and reads past the end return zeroes (protocol
   * nodes under a format: qcow2 appends clusters to its file this way).
   */
  growable?: boolean;
  /**
   * Overlapping writes, write-zeroes and discards are never in flight below this node at
   * once: the core starts one only after the overlapping ones before it completed (on every
   * child). For a node whose children must all apply them in one order (quorum); reads are
   * not held.
   */
  orderedWrites?: boolean;
  /**
   * A quorum above this node does not count its result as a vote: only its other children
   * decide (the primary-mode replication filter, whose forwarding failures are recorded, never returned:
   * decision 4 in docs/replication.md).
   */
  noQuorumVote?: boolean;
  /**
   * The node's whole content can be replaced atomically by a fresh file prepared beside it
   * (the file driver on a regular file, renamed over it): NodeImpl.prepareReplacement.
   */
  replace?: boolean;
}

/** A fresh file prepared to take a node's place (caps.replace). */
export interface PreparedReplacement {
  /**
   * Puts it in place atomically (a crash leaves the old content or the new, never a mix)
   * and drops the old content without writing back what was not yet written. Fails with the
   * old content still in place, or succeeds; usable once.
   */
  commit(): Promise<void>;
  /** Removes it unused. */
  discard(): Promise<void>;
}

export const DEFAULT_MAX_TRANSFER = 32 * 1024 * 1024;

export function makeCaps(partial: Partial<NodeCaps>): NodeCaps {
  return {
    requestAlignment: 1,
    maxTransfer: DEFAULT_MAX_TRANSFER,
    fua: false,
    writeZeroes: false,
    discard: false,
    blockStatus: false,
    truncate: false,
    ...partial,
  };
}

export interface NodeImpl {
  readonly caps: NodeCaps;
  /** current virtual length in bytes */
  getLength(): number;
  read(offset: number, length: number): Promise<Buffer>;
  /**
   * Reads buf.length bytes at `offset` into `buf` (the same bytes as read): no buffer of its
   * own, no zero-fill of bytes it then overwrites. Absent: the core reads and copies.
   */
  readInto?(offset: number, buf: Buffer): Promise<void>;
  write?(offset: number, data: Buffer, flags: WriteFlags): Promise<void>;
  writeZeroes?(offset: number, length: number, flags: ZeroFlags): Promise<void>;
  discard?(offset: number, length: number): Promise<void>;
  flush?(): Promise<void>;
  blockStatus?(offset: number, length: number): Promise<BlockStatus>;
  truncate?(length: number): Promise<void>;
  /** make every range unallocated so the backing chain shows through (qcow2) */
  makeEmpty?(): Promise<void>;
  /**
   * Prepares a fresh file holding `content` to replace this node's content (caps.replace):
   * written and made stable beside the current one, so that committing it costs no sync.
   */
  prepareReplacement?(content: Buffer): Promise<PreparedReplacement>;
  /** Waits for background work the driver started (qcow2: make_empty's truncation and spare). */
  settle?(): Promise<void>;
  /** switch between read-only and read-write (replication's start reopens RW) */
  reopen?(readOnly: boolean): Promise<void>;
  close(): Promise<void>;
  /**
   * The node's parents now take and share `perms` together (block/permissions.ts): check
   * that the node can follow (the file driver's image locks against other processes) and
   * prepare it, synchronously. Throws with QEMU's message when it cannot.
   */
  preparePerms?(perms: Perms): PermChange;
  /** a filename for messages and query output */
  readonly filename?: string;
  /** driver-specific fields for query-named-block-nodes / lockstep io info */
  info?(): Record<string, unknown>;
  /** a format's allocation unit in bytes (qcow2's cluster size); absent for others */
  readonly clusterSize?: number;
  /** x-blockdev-change: attach `child` as a new child (quorum); absent where unsupported */
  addChild?(child: BlockNode): unknown;
  /** x-blockdev-change: detach the child with this role (quorum) */
  removeChild?(role: string): unknown;
}

export interface OpenChildOptions {
  required?: boolean;
  /** open the child read-only even if the parent is writable (backing files) */
  readOnly?: boolean;
  /**
   * prefixed to an error opening or finding the child, not to a refusal attaching it
   * (QEMU's "Could not open backing file: ")
   */
  errorPrefix?: string;
}

export interface OpenContext {
  readonly graph: BlockGraph;
  /** the node being opened; children are attached to it */
  readonly node: BlockNode;
  readonly readOnly: boolean;
  /**
   * Opens an inline child definition (an object), resolves a reference to an existing
   * node-name (a string), or returns null for an absent/null value when not required.
   * The child is attached to `node` under `role`.
   */
  openChild(role: string, value: unknown, opts?: OpenChildOptions): Promise<BlockNode | null>;
}

export interface BlockDriver {
  readonly name: string;
  readonly kind: DriverKind;
  /** has a `backing` child (formats with COW) */
  readonly supportsBacking?: boolean;
  /** supports make_empty (replication refuses active/hidden images without it) */
  readonly supportsMakeEmpty?: boolean;
  /**
   * Opens the node. `opts` holds every option but `driver`, `node-name`, `read-only`,
   * `auto-read-only`, `discard`, `detect-zeroes`, `cache.*` that the graph consumes
   * itself... except those a driver reads explicitly. The driver must take every option it
   * understands and leave the rest for `opts.done()`, which reports the unexpected ones.
   */
  open(ctx: OpenContext, opts: OptionReader): Promise<NodeImpl>;
  /**
   * What `node` takes and shares on its child under `role`, given what its own parents
   * take and share together (`parent`). Absent: the kind's default (permissions.ts).
   */
  childPerms?(node: BlockNode, role: string, parent: Perms): Perms;
}
