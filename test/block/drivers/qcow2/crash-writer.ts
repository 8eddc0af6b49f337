// Child process for the crash test: opens a qcow2 image through lockstep and loops
// forever writing (and sometimes discarding) deterministic ranges derived from a seed,
// flushing after every batch and then printing the seeds of that batch, one per line.
// The parent kills it with SIGKILL at random moments. argv: image, first seed, batch size.
import { BlockGraph } from '../../../../src/block/graph.js';
import { createRegistry } from '../../../../src/block/registry.js';
import { crashOp } from './crash-ops.js';

const [image, firstSeedText, batchText] = process.argv.slice(2);
const g = new BlockGraph(createRegistry());
const node = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: image! } });
const size = node.getLength();
let seed = Number(firstSeedText);
const batch = Number(batchText);
for (let round = 0; round < 1_000_000; round++) {
  const seeds: number[] = [];
  for (let k = 0; k < batch; k++, seed++) {
    const op = crashOp(seed, size);
    if (op.kind === 'write') await node.write(op.offset, op.data);
    else await node.discard(op.offset, op.length);
    seeds.push(seed);
  }
  await node.flush();
  process.stdout.write(seeds.join('\n') + '\n');
}
