// The daemon's byte counters behind the pair's /metrics: a node counts the bytes its parents
// wrote through it, the primary counts only forwards that reached the secondary, the secondary
// counts the bytes written into its disk by the forward export's clients (not its own guest's).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { BlockGraph } from '../../src/block/graph.js';
import { createRegistry } from '../../src/block/registry.js';
import { createQcow2 } from '../../src/block/drivers/qcow2/create.js';
import { replicationRegistry } from '../../src/replication/registry.js';
import { primaryFixture } from '../helpers/replication.js';
import { tempDir } from '../helpers/graph.js';

const MiB = 1024 * 1024;

test('the primary counts the bytes it forwarded, not the forwards that failed', async (t) => {
  const { node, top, reg, fault } = await primaryFixture(t, 8 * MiB);
  await reg.startAll('primary');
  await top.write(100, Buffer.alloc(5000, 1));
  await top.writeZeroes(MiB, 70000);
  assert.equal(reg.query()[0]!['bytes-sent'], 75000);
  assert.equal(reg.query()[0]!['bytes-received'], undefined);
  fault.failWrites = 'EIO';
  await top.write(0, Buffer.alloc(4096, 2)); // succeeds for the guest, not sent
  assert.equal(reg.query()[0]!['bytes-sent'], 75000);
  // the node itself counts every write its parent made through it
  assert.equal(node.bytesWritten, 75000 + 4096);
});

test('the secondary counts the bytes written through its export, not its own guest writes nor the hidden copies', async (t) => {
  const dir = tempDir(t);
  for (const f of ['disk', 'active', 'hidden']) await createQcow2(join(dir, `${f}.qcow2`), { size: 4 * MiB });
  const graph = new BlockGraph(createRegistry());
  t.after(() => graph.closeAll());
  const diskNode = await graph.open({ 'node-name': 'disk', driver: 'qcow2', file: { driver: 'file', filename: join(dir, 'disk.qcow2') } });
  const exportWriter = graph.createBackend(diskNode, { name: 'forward-export' });
  const node = await graph.open({
    driver: 'replication',
    mode: 'secondary',
    'node-name': 's-repl',
    'top-id': 'secondary-vm',
    file: {
      driver: 'qcow2',
      file: { driver: 'file', filename: join(dir, 'active.qcow2') },
      backing: { driver: 'qcow2', file: { driver: 'file', filename: join(dir, 'hidden.qcow2') }, backing: 'disk' },
    },
  });
  const vm = graph.createBackend(node, { name: 'secondary-vm' });
  await exportWriter.write(0, Buffer.alloc(8192, 7)); // before replication: not received
  const reg = replicationRegistry(graph);
  await reg.startAll('secondary');
  assert.equal(reg.query()[0]!['bytes-received'], 0);
  await exportWriter.write(0, Buffer.alloc(3000, 8)); // copies old content into hidden first
  await exportWriter.writeZeroes(2 * MiB, 65536);
  await vm.write(MiB, Buffer.alloc(4096, 9)); // the secondary's own guest: not received
  const st = reg.query()[0]!;
  assert.equal(st['bytes-received'], 3000 + 65536);
  assert.equal(st['bytes-sent'], undefined);
  assert.ok(st['bytes-copied'] > 0, 'the hidden disk got the old content');
  await reg.doCheckpointAll();
  await exportWriter.write(3 * MiB, Buffer.alloc(100, 1));
  assert.equal(reg.query()[0]!['bytes-received'], 3000 + 65536 + 100);
  // a stop ends the copy job: what it received stays counted
  await reg.stopAll(false);
  assert.equal(reg.query()[0]!['bytes-received'], 3000 + 65536 + 100);
  graph.releaseBackend(vm);
  graph.releaseBackend(exportWriter);
});
