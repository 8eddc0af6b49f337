// Replication commands: QEMU's xen-set-replication, query-xen-replication-status,
// xen-colo-do-checkpoint and x-colo-lost-heartbeat, plus lockstep's own query-replication
// (every node, not just the first error) and block-io-hold / block-io-release (the barrier
// the pair supervisor takes around a checkpoint).

import { command, type QmpCommand, type QmpContext } from '../dispatch.js';
import { replicationRegistry } from '../../replication/registry.js';
import { InvalidArgumentError, StateError, errorMessage } from '../../errors.js';

declare module '../../block/graph.js' {
  interface GraphServices {
    /** block-io-hold's holds in force: node-name -> release */
    ioHolds?: Map<string, () => void>;
  }
}

/** The I/O holds in force, by node-name, kept with the graph they belong to. */
function holdTable(ctx: QmpContext): Map<string, () => void> {
  return (ctx.graph.services.ioHolds ??= new Map());
}

export const replicationCommands: readonly QmpCommand[] = [
  command('xen-set-replication', { enable: 'bool', primary: 'bool', '*failover': 'bool' }, async (ctx, args) => {
    const reg = replicationRegistry(ctx.graph);
    if (args.enable) {
      if (args.failover !== undefined) throw new InvalidArgumentError("Parameter 'failover' is only for stopping replication");
      await reg.startAll(args.primary ? 'primary' : 'secondary');
      ctx.log.info('replication started', { mode: args.primary ? 'primary' : 'secondary' });
      return {};
    }
    const failover = args.failover === true;
    try {
      await reg.stopAll(failover);
    } catch (e) {
      // QEMU discards every error of a failover stop; a plain stop reports the first
      if (!failover) throw e;
      ctx.log.warn('replication stop with failover reported an error', { error: errorMessage(e) });
    }
    ctx.log.info('replication stopped', { failover });
    return {};
  }),

  command('query-xen-replication-status', {}, async (ctx) => {
    try {
      await replicationRegistry(ctx.graph).getErrorAll();
      return { error: false };
    } catch (e) {
      return { error: true, desc: errorMessage(e) };
    }
  }),

  command('xen-colo-do-checkpoint', {}, async (ctx) => {
    await replicationRegistry(ctx.graph).doCheckpointAll();
    return {};
  }),

  // Without a COLO migration, "lost heartbeat" means: fail over this daemon's secondary
  // replication nodes. Errors are logged, as QEMU does.
  command('x-colo-lost-heartbeat', {}, async (ctx) => {
    const secondaries = replicationRegistry(ctx.graph)
      .list()
      .filter((s) => s.mode === 'secondary');
    if (secondaries.length === 0) throw new StateError('VM is not in COLO mode');
    for (const s of secondaries) {
      await s.stop(true).catch((e: unknown) => ctx.log.warn('failover reported an error', { node: s.node.name, error: errorMessage(e) }));
    }
    ctx.log.warn('failover requested (x-colo-lost-heartbeat)');
    return {};
  }),

  command('query-replication', {}, (ctx) => replicationRegistry(ctx.graph).query()),

  // lockstep: the primary's record of regions changed since the last confirmed checkpoint.
  // The pair supervisor resets it inside each checkpoint's barrier and reads it once the
  // secondary is lost, so that re-protection can copy only what changed.
  command('x-query-replication-changed', {}, (ctx) =>
    replicationRegistry(ctx.graph)
      .list()
      .map((s) => s.changedRegions())
      .filter((x) => x !== null),
  ),

  // lockstep: bytes written through a node by its parents since it was opened (writes and
  // write-zeroes that succeeded); the pair reads it on the served disk.
  command('x-query-node-written', { 'node-name': 'str' }, (ctx, args) => {
    const node = ctx.graph.getNode(args['node-name']);
    return { 'node-name': node.name, 'written-bytes': node.bytesWritten };
  }),

  command('x-replication-reset-changed', {}, (ctx) => {
    for (const s of replicationRegistry(ctx.graph).list()) s.changed?.reset();
    return {};
  }),

  command('block-io-hold', { 'node-name': 'str' }, async (ctx, args) => {
    const name = args['node-name'];
    const node = ctx.graph.getNode(name);
    const table = holdTable(ctx);
    if (table.has(name)) throw new StateError(`I/O on node '${name}' is already held`);
    // Reserve the entry first so that a second hold racing this one fails cleanly.
    table.set(name, () => {});
    try {
      table.set(name, await node.tracker.hold());
    } catch (e) {
      table.delete(name);
      throw e;
    }
    return {};
  }),

  command('block-io-release', { 'node-name': 'str' }, (ctx, args) => {
    const name = args['node-name'];
    ctx.graph.getNode(name);
    const table = holdTable(ctx);
    const release = table.get(name);
    if (!release) throw new StateError(`I/O on node '${name}' is not held`);
    table.delete(name);
    release();
    return {};
  }),
];
