// A primary-mode replication node forwarding to a local qcow2 through the test-fault filter,
// so that a test can make the forwards fail ("the secondary is gone").
import { join } from 'node:path';
import { BlockGraph } from '../../src/block/graph.js';
import { createRegistry } from '../../src/block/registry.js';
import type { Backend } from '../../src/block/backend.js';
import type { BlockNode } from '../../src/block/node.js';
import { createQcow2 } from '../../src/block/drivers/qcow2/create.js';
import { replicationRegistry, type ReplicationRegistry } from '../../src/replication/registry.js';
import { tempDir } from './graph.js';
import { faultDriver, faultControl } from './fault-driver.js';

export interface PrimaryFixture {
  graph: BlockGraph;
  node: BlockNode;
  top: Backend;
  reg: ReplicationRegistry;
  fault: ReturnType<typeof faultControl>;
  dir: string;
}

export async function primaryFixture(t: { after(fn: () => unknown): void }, size: number): Promise<PrimaryFixture> {
  const dir = tempDir(t);
  const file = join(dir, 'forward.qcow2');
  await createQcow2(file, { size });
  const graph = new BlockGraph(createRegistry([faultDriver]));
  t.after(() => graph.closeAll());
  const node = await graph.open({
    driver: 'replication',
    mode: 'primary',
    'node-name': 'p-repl',
    file: { driver: 'test-fault', 'node-name': 'p-fault', file: { driver: 'qcow2', file: { driver: 'file', filename: file } } },
  });
  const top = graph.createBackend(node, { name: 'p-top' });
  return { graph, node, top, reg: replicationRegistry(graph), fault: faultControl(graph.getNode('p-fault')), dir };
}
