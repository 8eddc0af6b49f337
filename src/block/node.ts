// A node of the block graph and its request path. Parents (nodes, backends) call the
// public I/O methods here, never the driver directly: this is where requests are checked,
// aligned (read-modify-write under a serialising tracked request), split at maxTransfer,
// emulated (write-zeroes, FUA) and tracked (overlapping writes ordered where the driver asks).

import { BlockError, StateError, assert } from '../errors.js';
import type { BlockDriver, BlockStatus, NodeImpl, PreparedReplacement, WriteFlags, ZeroFlags } from './driver.js';
import type { BlockGraph } from './graph.js';
import type { Backend } from './backend.js';
import type { OptionDict } from './options.js';
import { RequestTracker, type RequestMode } from './tracker.js';
import { IoGates } from './gate.js';
import { PERM_ALL } from './permissions.js';
import { span, tracing } from '../util/trace.js';

/**
 * An edge from a parent (node or backend) to a child node, under a role, with the
 * permissions the parent holds on the child and the ones it shares (block/permissions.ts):
 * a backend's are fixed, a node's follow from its own parents' and are kept up to date by
 * BlockGraph.refreshPerms.
 */
export class Edge {
  perm = 0;
  shared = PERM_ALL;
  constructor(
    readonly parent: BlockNode | Backend,
    readonly role: string,
    private _child: BlockNode,
  ) {}
  get child(): BlockNode {
    return this._child;
  }
  /** Re-points the edge; only BlockGraph calls this, after validating the whole edit. */
  setChild(node: BlockNode): void {
    this._child.parents.delete(this);
    this._child = node;
    node.parents.add(this);
  }
}

const ZERO_CHUNK = 1024 * 1024;
let sharedZeroes: Buffer | null = null;
/** A read-only zero buffer shared by write-zeroes emulation; nothing ever writes to it. */
function zeroBuffer(length: number): Buffer {
  if (!sharedZeroes) sharedZeroes = Buffer.alloc(ZERO_CHUNK);
  return length <= ZERO_CHUNK ? sharedZeroes.subarray(0, length) : Buffer.alloc(length);
}

export class BlockNode {
  readonly children = new Map<string, Edge>();
  readonly parents = new Set<Edge>();
  readonly tracker = new RequestTracker();
  /** waits around this node's requests beyond the tracker (output commit, lease): gate.ts */
  readonly gates = new IoGates();
  /** operation blockers: reason strings (replication's "Block device is in use by ...") */
  readonly blockers = new Set<string>();
  /** the jobs holding this node (QEMU's block_job_add_bdrv): such a node is not a root */
  readonly jobHolds = new Set<object>();
  /** created by blockdev-add / --blockdev: lives until blockdev-del */
  monitorOwned = false;
  /** force-share=on: every edge into this node shares every permission (qemu-img -U) */
  forceShare = false;
  /** opened for metadata only (qemu-img info): a format takes no consistent read on its file */
  noIo = false;
  closed = false;
  /** bytes its parents wrote through this node (writes and write-zeroes that succeeded) */
  bytesWritten = 0;
  private _impl: NodeImpl | null = null;

  constructor(
    readonly graph: BlockGraph,
    readonly name: string,
    readonly driver: BlockDriver,
    /** the options the node was opened with (for query output), minus children */
    readonly options: OptionDict,
    public readOnly: boolean,
    /** the name was generated (#blockNNN) */
    readonly autoName: boolean,
  ) {}

  get impl(): NodeImpl {
    assert(this._impl, `node ${this.name} is not open`);
    return this._impl;
  }
  setImpl(impl: NodeImpl): void {
    this._impl = impl;
  }
  get isOpen(): boolean {
    return this._impl !== null && !this.closed;
  }

  get caps() {
    return this.impl.caps;
  }

  /** The driver reads into the caller's buffer itself (readInto saves a copy, not adds one). */
  get readsInto(): boolean {
    return this.impl.readInto !== undefined;
  }

  get filename(): string {
    return this._impl?.filename ?? this.children.get('file')?.child.filename ?? this.name;
  }

  child(role: string): BlockNode | null {
    return this.children.get(role)?.child ?? null;
  }
  get file(): BlockNode | null {
    return this.child('file');
  }
  get backing(): BlockNode | null {
    return this.child('backing');
  }
  /** For a filter: the node whose data it shows. */
  get filtered(): BlockNode | null {
    return this.caps.filter ? this.file : null;
  }

  /** Backends (exports, devices) attached directly to this node. */
  backends(): Backend[] {
    const out: Backend[] = [];
    for (const e of this.parents) if (!(e.parent instanceof BlockNode) && !e.parent.jobHold) out.push(e.parent);
    return out;
  }
  parentNodes(): BlockNode[] {
    const out: BlockNode[] = [];
    for (const e of this.parents) if (e.parent instanceof BlockNode) out.push(e.parent);
    return out;
  }

  getLength(): number {
    return this.impl.getLength();
  }

  /** Throws StateError if an operation blocker is set (QEMU's "Node 'x' is busy: ..."). */
  checkNotBlocked(): void {
    for (const reason of this.blockers) throw new StateError(`Node '${this.name}' is busy: ${reason}`);
  }

  /**
   * QEMU's backing blocker (bdrv_backing_attach): a node that is some node's backing is
   * blocked for every operation but commit, stream and backup; the reason, or null.
   */
  backingBlocker(): string | null {
    for (const e of this.parents) {
      if (e.role !== 'backing' || !(e.parent instanceof BlockNode)) continue;
      const p = e.parent;
      return `node is used as backing hd of '${p.backends().find((b) => b.name !== undefined)?.name ?? p.name}'`;
    }
    return null;
  }

  /** checkNotBlocked, then the backing blocker (blockdev-del, block_resize, mirror). */
  checkNotBlockedOrBacking(): void {
    this.checkNotBlocked();
    const reason = this.backingBlocker();
    if (reason !== null) throw new StateError(`Node '${this.name}' is busy: ${reason}`);
  }

  // ---- request path -------------------------------------------------------------------

  private checkRange(offset: number, length: number, grow = false): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new BlockError('EINVAL', `invalid request: offset ${offset}, length ${length}`);
    }
    if (this.closed) throw new BlockError('ENOMEDIUM', `node '${this.name}' is closed`);
    if (offset + length > this.getLength() && !(grow && this.impl.caps.growable)) {
      throw new BlockError('EIO', `request [${offset}, +${length}) past the end of '${this.name}' (${this.getLength()} bytes)`);
    }
  }

  private checkWritable(): void {
    if (this.readOnly) throw new BlockError('EPERM', `node '${this.name}' is read-only`);
  }

  async read(offset: number, length: number): Promise<Buffer> {
    this.checkRange(offset, length, true);
    if (length === 0) return Buffer.alloc(0);
    const req = this.tracker.tryBegin(offset, length) ?? (await this.tracker.begin(offset, length));
    try {
      return await this.alignedRead(offset, length);
    } finally {
      this.tracker.end(req);
    }
  }

  /**
   * Reads buf.length bytes at `offset` into `buf`: the bytes read() would resolve with,
   * straight into the caller's buffer where the driver can (no allocation, no zero-fill).
   */
  async readInto(offset: number, buf: Buffer): Promise<void> {
    const length = buf.length;
    this.checkRange(offset, length, true);
    if (length === 0) return;
    const req = this.tracker.tryBegin(offset, length) ?? (await this.tracker.begin(offset, length));
    try {
      const impl = this.impl;
      const align = impl.caps.requestAlignment;
      if (impl.readInto && offset % align === 0 && length % align === 0 && length <= impl.caps.maxTransfer) {
        await impl.readInto(offset, buf);
      } else {
        (await this.alignedRead(offset, length)).copy(buf);
      }
    } finally {
      this.tracker.end(req);
    }
  }

  private async alignedRead(offset: number, length: number): Promise<Buffer> {
    const impl = this.impl;
    const align = impl.caps.requestAlignment;
    const start = offset - (offset % align);
    const end = roundUp(offset + length, align);
    const maxT = impl.caps.maxTransfer;
    if (start === offset && end === offset + length && length <= maxT) return impl.read(offset, length);
    const out = Buffer.allocUnsafe(length);
    for (let pos = start; pos < end; ) {
      const n = Math.min(maxT, end - pos);
      const chunk = await impl.read(pos, n);
      // copy the part of [pos, pos+n) that overlaps [offset, offset+length)
      const from = Math.max(pos, offset);
      const to = Math.min(pos + n, offset + length);
      if (to > from) chunk.copy(out, from - offset, from - pos, to - pos);
      pos += n;
    }
    return out;
  }

  write(offset: number, data: Buffer, flags: WriteFlags = {}): Promise<void> {
    return tracing ? span(`w ${this.driver.name} ${this.name}`, offset, this.doWrite(offset, data, flags)) : this.doWrite(offset, data, flags);
  }

  private async doWrite(offset: number, data: Buffer, flags: WriteFlags): Promise<void> {
    if (this.gates.size === 0) {
      await this.writeTracked(offset, data, flags);
    } else {
      await span('gate.admit', offset, this.gates.admitWrite());
      await this.writeTracked(offset, data, flags);
      await this.gates.completeWrite(flags.fua === true);
    }
    this.bytesWritten += data.length;
  }

  private async writeTracked(offset: number, data: Buffer, flags: WriteFlags): Promise<void> {
    const length = data.length;
    this.checkRange(offset, length, true);
    this.checkWritable();
    if (length === 0) return;
    const impl = this.impl;
    if (!impl.write) throw new BlockError('ENOTSUP', `driver '${this.driver.name}' does not support writes`);
    const align = impl.caps.requestAlignment;
    const aligned = offset % align === 0 && length % align === 0;
    const start = offset - (offset % align);
    const end = roundUp(offset + length, align);
    const mode = aligned ? writeMode(impl) : 'serialising';
    const req = this.tracker.tryBegin(start, end - start, mode) ?? (await this.tracker.begin(start, end - start, mode));
    try {
      if (aligned) {
        await this.splitWrite(offset, data, flags);
      } else {
        // read-modify-write of the partial head and tail blocks
        const buf = Buffer.allocUnsafe(end - start);
        const headLen = offset - start;
        if (headLen > 0) (await impl.read(start, align)).copy(buf, 0, 0, align);
        const tailStart = end - align;
        const tailPartial = end > offset + length;
        if (tailPartial && !(headLen > 0 && tailStart === start)) {
          (await impl.read(tailStart, align)).copy(buf, tailStart - start, 0, align);
        }
        data.copy(buf, headLen);
        await this.splitWrite(start, buf, flags);
      }
    } finally {
      this.tracker.end(req);
    }
  }

  private async splitWrite(offset: number, data: Buffer, flags: WriteFlags): Promise<void> {
    const impl = this.impl;
    const write = impl.write!.bind(impl);
    const maxT = impl.caps.maxTransfer;
    const nativeFua = impl.caps.fua;
    const f: WriteFlags = nativeFua && flags.fua ? { fua: true } : {};
    if (data.length <= maxT) await write(offset, data, f);
    else for (let pos = 0; pos < data.length; pos += maxT) await write(offset + pos, data.subarray(pos, pos + maxT), f);
    if (flags.fua && !nativeFua) await this.flushData();
  }

  writeZeroes(offset: number, length: number, flags: ZeroFlags = {}): Promise<void> {
    return tracing ? span(`z ${this.driver.name} ${this.name}`, offset, this.doWriteZeroes(offset, length, flags)) : this.doWriteZeroes(offset, length, flags);
  }

  private async doWriteZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    if (this.gates.size === 0) {
      await this.writeZeroesTracked(offset, length, flags);
    } else {
      await this.gates.admitWrite();
      await this.writeZeroesTracked(offset, length, flags);
      await this.gates.completeWrite(flags.fua === true);
    }
    this.bytesWritten += length;
  }

  private async writeZeroesTracked(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    this.checkRange(offset, length, true);
    this.checkWritable();
    if (length === 0) return;
    const impl = this.impl;
    const align = impl.caps.requestAlignment;
    if (impl.caps.writeZeroes && impl.writeZeroes) {
      const start = roundUp(offset, align);
      const end = Math.max(start, offset + length - ((offset + length) % align));
      // unaligned head/tail are written as zero buffers through the RMW path
      if (start > offset) await this.writeTracked(offset, zeroBuffer(Math.min(start, offset + length) - offset), { fua: flags.fua ?? false });
      if (end > start) {
        const req = await this.tracker.begin(start, end - start, writeMode(impl));
        try {
          await impl.writeZeroes(start, end - start, nativeZeroFlags(flags, impl.caps.fua));
          if (flags.fua && !impl.caps.fua) await this.flushData();
        } finally {
          this.tracker.end(req);
        }
      }
      if (offset + length > end && end >= start) await this.writeTracked(end, zeroBuffer(offset + length - end), { fua: flags.fua ?? false });
      return;
    }
    if (flags.noFallback) throw new BlockError('ENOTSUP', `node '${this.name}' has no fast zeroing`);
    for (let pos = offset; pos < offset + length; pos += ZERO_CHUNK) {
      if (pos > offset) await this.graph.pacer.pace();
      const n = Math.min(ZERO_CHUNK, offset + length - pos);
      await this.writeTracked(pos, zeroBuffer(n), { fua: flags.fua ?? false });
    }
  }

  async discard(offset: number, length: number): Promise<void> {
    if (this.gates.size > 0) await this.gates.admitWrite();
    this.checkRange(offset, length);
    this.checkWritable();
    const impl = this.impl;
    if (!impl.caps.discard || !impl.discard || length === 0) return; // advisory
    const align = impl.caps.requestAlignment;
    const start = roundUp(offset, align);
    const end = offset + length - ((offset + length) % align);
    if (end <= start) return;
    const req = await this.tracker.begin(start, end - start, writeMode(impl));
    try {
      await impl.discard(start, end - start);
    } finally {
      this.tracker.end(req);
    }
  }

  flush(): Promise<void> {
    return tracing ? span(`f ${this.driver.name} ${this.name}`, -1, this.doFlush()) : this.doFlush();
  }

  private async doFlush(): Promise<void> {
    await this.flushData();
    if (this.gates.size > 0) await this.gates.completeFlush();
  }

  /** The flush itself, without the gates (also the FUA emulation's flush). */
  private async flushData(): Promise<void> {
    if (this.closed) throw new BlockError('ENOMEDIUM', `node '${this.name}' is closed`);
    const impl = this.impl;
    if (impl.flush) await impl.flush();
    else for (const e of this.children.values()) if (!e.child.readOnly) await e.child.flush();
  }

  /**
   * This node's own status at `offset` (at most `length` bytes). Filters without their own
   * answer pass it through to `file`. Drivers without block status report allocated data.
   */
  async blockStatus(offset: number, length: number): Promise<BlockStatus> {
    this.checkRange(offset, length);
    const impl = this.impl;
    if (length === 0) return { length: 0, allocated: true, data: true, zero: false };
    if (impl.caps.blockStatus && impl.blockStatus) {
      const s = await impl.blockStatus(offset, length);
      assert(s.length > 0, `${this.driver.name}: block status of length 0`);
      if (s.length > length) return { ...s, length };
      return s;
    }
    const f = this.filtered;
    if (f) return f.blockStatus(offset, length);
    return { length, allocated: true, data: true, zero: false };
  }

  async truncate(length: number): Promise<void> {
    // QEMU's bdrv_co_truncate, at every layer (a writable raw over a read-only file)
    if (this.readOnly) throw new BlockError('EACCES', 'Image is read-only');
    const impl = this.impl;
    if (!impl.caps.truncate || !impl.truncate) throw new BlockError('ENOTSUP', `driver '${this.driver.name}' cannot resize images`);
    await this.tracker.drain();
    await impl.truncate(length);
  }

  async makeEmpty(): Promise<void> {
    const impl = this.impl;
    if (!impl.makeEmpty) throw new BlockError('ENOTSUP', `driver '${this.driver.name}' does not support make_empty`);
    await this.tracker.holding(() => impl.makeEmpty!());
  }

  /**
   * A fresh file with `content` prepared to replace this node's content (caps.replace); its
   * commit first drains this node's requests and holds new ones until it is in place.
   */
  async prepareReplacement(content: Buffer): Promise<PreparedReplacement> {
    this.checkWritable();
    const impl = this.impl;
    if (!impl.caps.replace || !impl.prepareReplacement) throw new BlockError('ENOTSUP', `driver '${this.driver.name}' cannot replace its content`);
    const r = await impl.prepareReplacement(content);
    return {
      commit: async () => {
        if (this.closed) throw new BlockError('ENOMEDIUM', `node '${this.name}' is closed`);
        await this.tracker.holding(() => r.commit());
      },
      discard: () => r.discard(),
    };
  }

  /** Waits for background work the driver started (NodeImpl.settle). */
  async settle(): Promise<void> {
    if (this._impl?.settle && !this.closed) await this._impl.settle();
  }

  /**
   * Reopens read-only or read-write (no-op when unchanged). The node's requests are drained
   * and held first: a reopen may swap the driver's handle (the file driver's descriptor), and
   * a request already given the old one (a fallocate on its descriptor number) must finish
   * before that descriptor is closed and its number reused.
   */
  async setReadOnly(readOnly: boolean): Promise<void> {
    if (readOnly === this.readOnly) return;
    const impl = this._impl;
    if (readOnly) {
      // QEMU's reopen queue: what the node needs of its children drops before a child turns
      // read-only under it (a read-only node refuses writers)
      this.readOnly = true;
      try {
        this.graph.refreshPerms([this]);
        if (impl?.reopen) await this.tracker.holding(() => impl.reopen!(true));
      } catch (e) {
        this.readOnly = false;
        this.graph.refreshPermsQuietly([this]);
        throw e;
      }
      return;
    }
    if (impl?.reopen) await this.tracker.holding(() => impl.reopen!(readOnly));
    this.readOnly = readOnly;
    // a format's needs on its file follow its writability (QEMU reopens with new perms)
    try {
      this.graph.refreshPerms([this]);
    } catch (e) {
      if (this._impl?.reopen) await this._impl.reopen(!readOnly).catch(() => {});
      this.readOnly = !readOnly;
      this.graph.refreshPermsQuietly([this]);
      throw e;
    }
  }
}

/** How a mutation of this node is tracked: ordered where the driver asks for it. */
function writeMode(impl: NodeImpl): RequestMode {
  return impl.caps.orderedWrites ? 'ordered' : 'shared';
}

function nativeZeroFlags(flags: ZeroFlags, nativeFua: boolean): ZeroFlags {
  const f: ZeroFlags = {};
  if (flags.mayUnmap) f.mayUnmap = true;
  if (flags.noFallback) f.noFallback = true;
  if (flags.fua && nativeFua) f.fua = true;
  return f;
}

export function roundUp(n: number, align: number): number {
  const r = n % align;
  return r === 0 ? n : n + align - r;
}
