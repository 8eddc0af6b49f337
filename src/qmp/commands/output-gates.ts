// lockstep's commands for the primary's served node (docs/replication.md, "Output commit"
// and "Lease fencing"): output commit of flushes and FUA writes (x-block-flush-commit*),
// and the lease that fences writes (x-block-lease*). Both are gates on the node's request
// path (src/block/gate.ts); the pair supervisor drives them, and so can any QMP user.

import { command, type QmpCommand, type QmpContext } from '../dispatch.js';
import { enumOf } from '../schema/types.js';
import { StateError } from '../../errors.js';
import type { BlockNode } from '../../block/node.js';
import { FLUSH_COMMIT_GATE, FlushCommit, fencedError } from '../../replication/flush-commit.js';
import { LEASE_GATE, Lease, type LeaseExpiry } from '../../replication/lease.js';

function flushCommitOf(node: BlockNode): FlushCommit | undefined {
  const g = node.gates.get(FLUSH_COMMIT_GATE);
  return g instanceof FlushCommit ? g : undefined;
}

function leaseOf(node: BlockNode): Lease | undefined {
  const g = node.gates.get(LEASE_GATE);
  return g instanceof Lease ? g : undefined;
}

function gated<T>(ctx: QmpContext, of: (n: BlockNode) => T | undefined): T[] {
  const out: T[] = [];
  for (const n of ctx.graph.nodes.values()) {
    const g = of(n);
    if (g) out.push(g);
  }
  return out;
}

const emitter = (ctx: QmpContext) => (name: string, data: Record<string, unknown>) => void ctx.events.emitEvent(name, data);

export const outputGateCommands: readonly QmpCommand[] = [
  // enable: flushes and FUA writes on the node complete only at x-block-flush-commit-release;
  // disable: what waits completes now, and nothing waits any more.
  command('x-block-flush-commit', { 'node-name': 'str', enable: 'bool' }, (ctx, args) => {
    const node = ctx.graph.getNode(args['node-name']);
    const have = flushCommitOf(node);
    if (args.enable) {
      if (have) throw new StateError(`Flush commit is already enabled on node '${node.name}'`);
      if (leaseOf(node)?.status().demoted) throw new StateError(`node '${node.name}' was demoted`);
      node.gates.set(FLUSH_COMMIT_GATE, new FlushCommit(node, emitter(ctx)));
    } else {
      if (!have) throw new StateError(`Flush commit is not enabled on node '${node.name}'`);
      node.gates.delete(FLUSH_COMMIT_GATE);
    }
    return {};
  }),

  // Sent inside a checkpoint's barrier once the secondary has checkpointed.
  command('x-block-flush-commit-release', { 'node-name': 'str' }, (ctx, args) => {
    const node = ctx.graph.getNode(args['node-name']);
    const fc = flushCommitOf(node);
    if (!fc) throw new StateError(`Flush commit is not enabled on node '${node.name}'`);
    return fc.release();
  }),

  command('x-query-block-flush-commit', {}, (ctx) => gated(ctx, flushCommitOf).map((g) => g.status())),

  command(
    'x-block-lease',
    { 'node-name': 'str', 'duration-ms': 'number', '*since': 'number', '*on-expiry': enumOf('suspend-io', 'io-error') },
    (ctx, args) => {
      const node = ctx.graph.getNode(args['node-name']);
      let lease = leaseOf(node);
      const onExpiry: LeaseExpiry | undefined = args['on-expiry'];
      if (!lease) {
        if (node.readOnly) throw new StateError(`node '${node.name}' is read-only: there are no writes to fence`);
        lease = new Lease(node, onExpiry ?? 'suspend-io', emitter(ctx));
        const granted = lease.grant(args['duration-ms'], args.since);
        node.gates.set(LEASE_GATE, lease);
        return granted;
      }
      if (onExpiry) lease.onExpiry = onExpiry;
      return lease.grant(args['duration-ms'], args.since);
    },
  ),

  // This daemon is no longer primary for the node: held writes and completions fail, and so
  // does every later write or flush. Also on a node without a lease (a fence of its own).
  command('x-block-lease-demote', { 'node-name': 'str' }, (ctx, args) => {
    const node = ctx.graph.getNode(args['node-name']);
    let lease = leaseOf(node);
    if (!lease) {
      lease = new Lease(node, 'suspend-io', emitter(ctx));
      node.gates.set(LEASE_GATE, lease);
    }
    const failed = lease.demote() + (flushCommitOf(node)?.fail(fencedError(node)) ?? 0);
    return { failed };
  }),

  command('x-query-block-lease', {}, (ctx) => gated(ctx, leaseOf).map((g) => g.status())),
];
