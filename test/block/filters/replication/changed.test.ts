// The primary's record of changed regions: what a re-protection after losing the secondary
// would have to copy. Everything the guest changed since the last reset is listed, whether or
// not the forward reached the secondary.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ChangedMap, CHANGED_GRANULARITY as G } from '../../../../src/block/filters/replication/changed.js';
import { replicationStateOf } from '../../../../src/block/filters/replication/filter.js';
import { faultControl } from '../../../helpers/fault-driver.js';
import { primaryFixture } from '../../../helpers/replication.js';

const MiB = 1024 * 1024;

test('ChangedMap merges adjacent granules, clips the last one and resets', () => {
  const m = new ChangedMap(10 * G + 512);
  m.mark(G + 1, 1); // inside granule 1
  m.mark(2 * G - 1, 2); // granules 1 and 2
  m.mark(10 * G, 10); // the partial last granule
  assert.deepEqual(m.regions(), [
    { offset: G, length: 2 * G },
    { offset: 10 * G, length: 512 },
  ]);
  assert.equal(m.bytes(), 2 * G + 512);
  assert.equal(m.granules, 3);
  m.mark(0, 0);
  assert.equal(m.granules, 3);
  m.reset();
  assert.deepEqual(m.regions(), []);
  assert.equal(m.bytes(), 0);
});

test('the primary lists every changed region, forwarded or not, until reset', async (t) => {
  const { graph, node, top, reg } = await primaryFixture(t, 8 * MiB);
  const state = replicationStateOf(node)!;
  await reg.startAll('primary');

  await top.write(3 * G + 100, Buffer.alloc(200, 1));
  assert.deepEqual(state.changedRegions()!.regions, [{ offset: 3 * G, length: G }]);
  state.changed!.reset(); // a confirmed checkpoint

  // the secondary is gone: forwards fail, the guest's writes succeed and are recorded
  faultControl(graph.getNode('p-fault')).failWrites = 'EIO';
  await top.write(0, Buffer.alloc(4096, 2));
  await top.writeZeroes(5 * G, 2 * G);
  await top.discard(100 * G, G);
  const c = state.changedRegions()!;
  assert.equal(c['node-name'], 'p-repl');
  assert.equal(c.granularity, G);
  assert.deepEqual(c.regions, [
    { offset: 0, length: G },
    { offset: 5 * G, length: 2 * G },
    { offset: 100 * G, length: G },
  ]);
  assert.equal(c.bytes, 4 * G);
  assert.equal(reg.query()[0]!['changed-bytes'], 4 * G);
  await assert.rejects(reg.getErrorAll(), { message: 'I/O error occurred' });
});
