// The handle a user of the graph holds on a node: an NBD export, a device attached
// through the library API, a test. A named backend is a "block backend" in the sense of the
// replication (decision 12 in docs/replication.md). Jobs and the monitor's qemu-io use unnamed, internal
// backends that do not count.
//
// The edge to the node can be re-pointed by graph edits (a filter inserted above the node,
// a commit that replaces it), so a backend always reads `edge.child` at request time.

import { BlockError } from '../errors.js';
import type { BlockStatus, WriteFlags, ZeroFlags } from './driver.js';
import { Edge, type BlockNode } from './node.js';
import { exportPerms, type Perms } from './permissions.js';

export interface BackendOptions {
  /** user-visible name (device id, export id); absent for internal users */
  name?: string;
  /** refuse writes through this backend */
  readOnly?: boolean;
  /** counts as a block backend for replication's checks (exports, devices) */
  user?: boolean;
  /**
   * the write cache is off (QEMU's cache=writethrough/directsync): every write and
   * write-zeroes is FUA, so it is stable when it completes
   */
  writethrough?: boolean;
  /**
   * what the user takes and shares on the node (block/permissions.ts); default an export's:
   * consistent read, write unless read-only, everything shared
   */
  perms?: Perms;
  /** the node's role in the edge, for conflict messages (QEMU: 'root', a job's 'target') */
  role?: string;
  /** who the user is, for conflict messages, when not a block device */
  desc?: string;
  /** a job's hold on a node: permissions only, not listed by BlockNode.backends() */
  jobHold?: boolean;
}

export class Backend {
  readonly edge: Edge;
  readonly name: string | undefined;
  readonly readOnly: boolean;
  readonly user: boolean;
  readonly writethrough: boolean;
  /**
   * Writes fail with EIO while fenced (decision 6 in docs/replication.md: the secondary disk's
   * exports refuse primary writes from the moment failover begins). Reads keep working.
   */
  fenced = false;
  closed = false;
  private readonly descText: string | undefined;
  readonly jobHold: boolean;

  constructor(node: BlockNode, opts: BackendOptions = {}) {
    this.name = opts.name;
    this.readOnly = opts.readOnly ?? false;
    this.user = opts.user ?? opts.name !== undefined;
    this.writethrough = opts.writethrough ?? false;
    this.descText = opts.desc;
    this.jobHold = opts.jobHold ?? false;
    this.edge = new Edge(this, opts.role ?? 'root', node);
    const perms = opts.perms ?? exportPerms(!this.readOnly);
    this.edge.perm = perms.perm;
    this.edge.shared = perms.shared;
    node.parents.add(this.edge);
  }

  /** QEMU's blk_root_get_parent_desc, for permission conflict messages */
  get desc(): string {
    if (this.descText !== undefined) return this.descText;
    return this.name !== undefined ? `block device '${this.name}'` : 'an unnamed block device';
  }

  get node(): BlockNode {
    return this.edge.child;
  }

  getLength(): number {
    return this.node.getLength();
  }

  private checkOpen(): void {
    if (this.closed) throw new BlockError('ENOMEDIUM', 'backend is closed');
  }

  /** Users never reach past the end, even of a growable node. */
  private checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new BlockError('EINVAL', `invalid request: offset ${offset}, length ${length}`);
    }
    if (offset + length > this.getLength()) {
      throw new BlockError('EIO', `request [${offset}, +${length}) past the end of the device (${this.getLength()} bytes)`);
    }
  }

  private checkWrite(offset: number, length: number): void {
    this.checkOpen();
    this.checkRange(offset, length);
    if (this.readOnly) throw new BlockError('EPERM', 'backend is read-only');
    if (this.fenced) throw new BlockError('EIO', 'writes are fenced: the secondary has failed over');
  }

  async read(offset: number, length: number): Promise<Buffer> {
    this.checkOpen();
    this.checkRange(offset, length);
    return this.node.read(offset, length);
  }
  /** Reads buf.length bytes at `offset` into `buf` (the bytes read() would resolve with). */
  async readInto(offset: number, buf: Buffer): Promise<void> {
    this.checkOpen();
    this.checkRange(offset, buf.length);
    return this.node.readInto(offset, buf);
  }
  async write(offset: number, data: Buffer, flags?: WriteFlags): Promise<void> {
    this.checkWrite(offset, data.length);
    return this.node.write(offset, data, this.writethrough ? { ...flags, fua: true } : flags);
  }
  async writeZeroes(offset: number, length: number, flags?: ZeroFlags): Promise<void> {
    this.checkWrite(offset, length);
    return this.node.writeZeroes(offset, length, this.writethrough ? { ...flags, fua: true } : flags);
  }
  async discard(offset: number, length: number): Promise<void> {
    this.checkWrite(offset, length);
    return this.node.discard(offset, length);
  }
  flush(): Promise<void> {
    this.checkOpen();
    return this.node.flush();
  }
  async blockStatus(offset: number, length: number): Promise<BlockStatus> {
    this.checkOpen();
    this.checkRange(offset, length);
    return this.node.blockStatus(offset, length);
  }

  /** Detaches from the node (the graph may then close nodes nothing references). */
  release(): void {
    if (this.closed) return;
    this.closed = true;
    this.node.parents.delete(this.edge);
    this.node.graph.refreshPermsQuietly([this.node]);
    this.node.graph.collect(this.node);
  }
}
