// A test-only protocol driver that forwards every request to a Backend of another graph,
// standing in for an NBD connection between a primary and a secondary in one process.
// Option `target`: the id under which the Backend was put into the graph's objects.
import { makeCaps, type BlockDriver, type NodeImpl } from '../../src/block/driver.js';
import { InvalidArgumentError } from '../../src/errors.js';
import { Backend } from '../../src/block/backend.js';

export const bridgeDriver: BlockDriver = {
  name: 'test-bridge',
  kind: 'protocol',
  async open(ctx, o): Promise<NodeImpl> {
    const id = o.string('target', true);
    o.done();
    const target = ctx.graph.objects.get(id);
    if (!(target instanceof Backend)) throw new InvalidArgumentError(`no bridge target '${id}'`);
    return {
      caps: makeCaps({ writeZeroes: true, discard: true }),
      filename: `bridge:${id}`,
      getLength: () => target.getLength(),
      read: (offset, length) => target.read(offset, length),
      write: (offset, data, flags) => target.write(offset, data, flags),
      writeZeroes: (offset, length, flags) => target.writeZeroes(offset, length, flags),
      discard: (offset, length) => target.discard(offset, length),
      flush: () => target.flush(),
      close: async () => {},
    };
  },
};
