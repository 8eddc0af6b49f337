// Multi-child driver "quorum": every write goes to all children, reads come from the first
// child that answers (read-pattern=fifo) or are voted on (read-pattern=quorum).
// Options: children (list or children.N), vote-threshold (required), read-pattern
// (quorum|fifo), rewrite-corrupted, blkverify.
//
// Voting differs from QEMU in one deliberate way (decision 4 in docs/replication.md): a child
// that is a primary-mode replication filter never votes. QEMU counts the primary replication filter's
// recorded-but-hidden failure as a success, so with vote-threshold 1 a failed write to the
// local disk was reported done. Here a write succeeds only if enough *voting* children
// succeeded; failures of non-voting children are reported (QUORUM_REPORT_BAD) and left to
// the replication filter's get_error.
//
// Discards (decision 10 there) are applied to every child as write-zeroes that may unmap, so both
// sides of a replication pair reclaim space and read zeroes there.
//
// Overlapping writes (write-zeroes, discards) are ordered (caps.orderedWrites): one that
// overlaps earlier ones still in flight starts only when those completed on every child.
// Sent to all children at once, two overlapping writes could otherwise land in one order on
// one child and in the other order on another (the local disk and the secondary of a
// replication pair), leaving the children different for good. Reads are not held.
//
// Children are added and removed at run time (x-blockdev-change): adding names the next
// index, removing the highest-numbered child frees its index (stable names, QEMU 5.2+).

import { quorumChildPerms } from '../permissions.js';
import { createHash } from 'node:crypto';
import { makeCaps, type BlockDriver, type NodeImpl, type WriteFlags, type ZeroFlags } from '../driver.js';
import { BlockError, InvalidArgumentError, StateError, errorMessage } from '../../errors.js';
import { isDict } from '../options.js';
import type { BlockNode } from '../node.js';

export interface QuorumControl {
  /** x-blockdev-change node=...: attaches an existing parentless node as children.<next> */
  addChild(child: BlockNode): string;
  /** x-blockdev-change child=...: detaches a child by its role name */
  removeChild(role: string): void;
}

export type QuorumImpl = NodeImpl & QuorumControl;

function childList(value: unknown): unknown[] {
  if (Array.isArray(value)) return value;
  if (isDict(value)) {
    const keys = Object.keys(value);
    for (const k of keys) if (!/^\d+$/.test(k)) throw new InvalidArgumentError(`Parameter 'children.${k}' is unexpected`);
    return keys.sort((a, b) => Number(a) - Number(b)).map((k) => value[k]);
  }
  if (value === undefined) return [];
  throw new InvalidArgumentError(`Invalid parameter type for 'children', expected: array`);
}

const SECTOR = 512;

export const quorumDriver: BlockDriver = {
  name: 'quorum',
  kind: 'multi',
  childPerms(node, _role, parent) {
    const rc = node.options['rewrite-corrupted'];
    return quorumChildPerms(parent, rc === true || rc === 'on');
  },
  async open(ctx, o): Promise<NodeImpl> {
    const threshold = o.int('vote-threshold', true);
    const readPattern = o.enumOf('read-pattern', ['quorum', 'fifo']) ?? 'quorum';
    const rewriteCorrupted = o.bool('rewrite-corrupted', false);
    const blkverify = o.bool('blkverify', false);
    const childValues = childList(o.raw('children'));
    o.done();
    if (childValues.length < 1) throw new InvalidArgumentError('Number of provided children must be 1 or more');
    if (threshold < 1) throw new InvalidArgumentError(`Parameter 'vote-threshold' expects a value >= 1`);
    if (threshold > childValues.length) throw new InvalidArgumentError('threshold may not exceed children count');
    if (blkverify && (childValues.length !== 2 || threshold !== 2)) {
      throw new InvalidArgumentError('blkverify=on can only be set if there are exactly two files and vote-threshold is 2');
    }
    if (rewriteCorrupted && readPattern === 'fifo') {
      throw new InvalidArgumentError('rewrite-corrupted=on cannot be used with read-pattern=fifo');
    }

    for (let i = 0; i < childValues.length; i++) {
      await ctx.openChild(`children.${i}`, childValues[i], { required: true });
    }
    return new QuorumNode(ctx.node, threshold, readPattern, rewriteCorrupted, blkverify, childValues.length);
  },
};

/** The state of an open quorum node: its vote rules and the next child index. */
class QuorumNode implements QuorumImpl {
  readonly caps = makeCaps({ writeZeroes: true, discard: true, fua: true, orderedWrites: true });
  /** the first child at open: its length answers while no child is attached */
  private readonly first: BlockNode;

  constructor(
    private readonly node: BlockNode,
    private readonly threshold: number,
    private readonly readPattern: 'quorum' | 'fifo',
    private readonly rewriteCorrupted: boolean,
    private readonly blkverify: boolean,
    private nextIndex: number,
  ) {
    this.first = this.children()[0]!.node;
  }

  get filename(): string {
    return `quorum:${this.node.name}`;
  }

  private children(): Array<{ role: string; node: BlockNode }> {
    return [...this.node.children.values()]
      .filter((e) => e.role.startsWith('children.'))
      .sort((a, b) => Number(a.role.slice(9)) - Number(b.role.slice(9)))
      .map((e) => ({ role: e.role, node: e.child }));
  }

  private reportBad(type: 'read' | 'write' | 'flush', child: BlockNode, offset: number, length: number, err?: unknown): void {
    const data: Record<string, unknown> = {
      type,
      'node-name': child.name,
      'sector-num': Math.floor(offset / SECTOR),
      'sectors-count': Math.ceil((offset + length) / SECTOR) - Math.floor(offset / SECTOR),
    };
    if (err !== undefined) data.error = errorMessage(err);
    this.node.graph.emit('event', 'QUORUM_REPORT_BAD', data);
  }

  private reportFailure(offset: number, length: number): void {
    this.node.graph.emit('event', 'QUORUM_FAILURE', {
      reference: this.node.name,
      'sector-num': Math.floor(offset / SECTOR),
      'sectors-count': Math.ceil((offset + length) / SECTOR) - Math.floor(offset / SECTOR),
    });
  }

  /** Runs op on every child; succeeds when enough voting children succeed. */
  private async broadcast(type: 'write' | 'flush', offset: number, length: number, op: (child: BlockNode) => Promise<void>): Promise<void> {
    const list = this.children();
    const results = await Promise.allSettled(list.map((c) => op(c.node)));
    let ok = 0;
    let firstErr: unknown = null;
    results.forEach((r, i) => {
      const c = list[i]!;
      if (r.status === 'fulfilled') {
        if (votes(c.node)) ok++;
      } else {
        this.reportBad(type, c.node, offset, length, r.reason);
        if (votes(c.node) && firstErr === null) firstErr = r.reason;
      }
    });
    if (ok >= this.threshold) return;
    if (firstErr instanceof BlockError) throw firstErr;
    throw new BlockError('EIO', `quorum: only ${ok} of ${this.threshold} required children succeeded`, { cause: firstErr });
  }

  private async readFifo(offset: number, length: number): Promise<Buffer> {
    let lastErr: unknown = null;
    for (const c of this.children()) {
      try {
        return await c.node.read(offset, length);
      } catch (e) {
        this.reportBad('read', c.node, offset, length, e);
        lastErr = e;
      }
    }
    if (lastErr instanceof BlockError) throw lastErr;
    throw new BlockError('EIO', 'quorum: no child could be read', { cause: lastErr });
  }

  private async readVote(offset: number, length: number): Promise<Buffer> {
    const list = this.children();
    const results = await Promise.allSettled(list.map((c) => c.node.read(offset, length)));
    const groups = new Map<string, { buf: Buffer; members: BlockNode[] }>();
    results.forEach((r, i) => {
      const c = list[i]!;
      if (r.status === 'rejected') {
        this.reportBad('read', c.node, offset, length, r.reason);
        return;
      }
      const h = createHash('sha256').update(r.value).digest('hex');
      const g = groups.get(h);
      if (g) g.members.push(c.node);
      else groups.set(h, { buf: r.value, members: [c.node] });
    });
    let winner: { buf: Buffer; members: BlockNode[] } | null = null;
    for (const g of groups.values()) if (!winner || g.members.length > winner.members.length) winner = g;
    if (!winner || winner.members.length < this.threshold) {
      this.reportFailure(offset, length);
      throw new BlockError('EIO', 'quorum: the children disagree and no version reached the vote threshold');
    }
    for (const g of groups.values()) {
      if (g === winner) continue;
      for (const n of g.members) {
        this.reportBad('read', n, offset, length);
        if (this.rewriteCorrupted) await n.write(offset, winner.buf).catch(() => {});
      }
    }
    return winner.buf;
  }

  getLength(): number {
    const list = this.children();
    return list.length ? list[0]!.node.getLength() : this.first.getLength();
  }

  read(offset: number, length: number): Promise<Buffer> {
    return this.readPattern === 'fifo' ? this.readFifo(offset, length) : this.readVote(offset, length);
  }

  write(offset: number, data: Buffer, flags: WriteFlags): Promise<void> {
    return this.broadcast('write', offset, data.length, (c) => c.write(offset, data, flags));
  }

  writeZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    return this.broadcast('write', offset, length, (c) => c.writeZeroes(offset, length, flags));
  }

  discard(offset: number, length: number): Promise<void> {
    return this.broadcast('write', offset, length, (c) => c.writeZeroes(offset, length, { mayUnmap: true }));
  }

  flush(): Promise<void> {
    return this.broadcast('flush', 0, 0, (c) => c.flush());
  }

  async close(): Promise<void> {}

  info(): Record<string, unknown> {
    return { 'vote-threshold': this.threshold, 'read-pattern': this.readPattern, children: this.children().map((c) => c.role) };
  }

  addChild(child: BlockNode): string {
    if (this.blkverify) throw new StateError('Cannot add a child to a quorum in blkverify mode');
    if (child.parents.size > 0) throw new StateError(`Node '${child.name}' already has a parent`);
    const role = `children.${this.nextIndex}`;
    this.node.graph.attach(this.node, role, child);
    this.nextIndex++;
    return role;
  }

  removeChild(role: string): void {
    const node = this.node;
    const edge = node.children.get(role);
    if (!edge || !role.startsWith('children.')) throw new StateError(`Node '${node.name}' does not have child '${role}'`);
    if (this.children().length <= this.threshold) {
      throw new StateError(`The number of children cannot be lower than the vote threshold ${this.threshold}`);
    }
    if (this.blkverify) throw new StateError('Cannot remove a child from a quorum in blkverify mode');
    node.graph.detach(node, role);
    if (Number(role.slice(9)) === this.nextIndex - 1) this.nextIndex--;
  }
}

/** A child votes unless its driver says it never does (a primary-mode replication filter). */
function votes(n: BlockNode): boolean {
  return n.caps.noQuorumVote !== true;
}
