// Commit on backing chains of the test-only copy-on-write overlay (in memory); the qcow2
// variants are in commit-qcow2.test.ts.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { JobManager } from '../../src/jobs/job.js';
import { startCommit } from '../../src/jobs/commit.js';
import { startBackup } from '../../src/jobs/backup.js';
import { BlockError } from '../../src/errors.js';
import { pattern } from '../helpers/graph.js';
import { newCowGraph } from '../helpers/cow.js';
import { addNode, fill, nextEvent, recordEvents, rng } from '../helpers/jobs.js';
import type { Backend } from '../../src/block/backend.js';

const KiB = 1024;
const MiB = 1024 * KiB;

async function randomWrites(be: Backend, model: Buffer, seed: number, rounds: number): Promise<void> {
  const r = rng(seed);
  const slots = 8;
  const slot = Math.floor(model.length / slots);
  for (let round = 0; round < rounds; round++) {
    const ops: Promise<void>[] = [];
    for (let s = 0; s < slots; s++) {
      const offset = s * slot + r(slot / 2);
      const length = 1 + r(slot / 2);
      const data = fill(seed + round * 100 + s, length);
      data.copy(model, offset);
      ops.push(be.write(offset, data));
    }
    await Promise.all(ops);
    await new Promise((res) => setImmediate(res));
  }
}

test('active commit with autoComplete folds active and hidden into the base under concurrent writes', async () => {
  const g = newCowGraph();
  const mgr = new JobManager(g);
  const size = 4 * MiB;
  const base = await addNode(g, { driver: 'memory', size, 'node-name': 'secondary' });
  await base.write(0, pattern(0x11, size));
  // active and hidden belong to the chain only (as replication's are): they leave with it
  const active = await g.open({
    driver: 'test-cow',
    'node-name': 'active',
    backing: { driver: 'test-cow', 'node-name': 'hidden', 'read-only': false, backing: 'secondary' },
  });
  const hidden = g.getNode('hidden');
  const be = g.createBackend(active, { name: 'colo-disk0' });
  await hidden.write(2 * MiB, pattern(0x44, MiB));
  await be.write(0, pattern(0x33, MiB));
  const model = pattern(0x11, size).fill(0x33, 0, MiB).fill(0x44, 2 * MiB, 3 * MiB);
  let progress = 0;
  const job = await startCommit(mgr, { top: active, base, active: true, autoComplete: true, internal: true, onProgress: (c) => (progress = c) });
  await randomWrites(be, model, 5, 6);
  const r = await job.done;
  assert.equal(r.ret, 0);
  assert.ok(progress > 0);
  assert.equal(be.node, base, 'the device now writes the base directly');
  assert.ok((await base.read(0, size)).equals(model));
  await g.settle();
  assert.deepEqual([...g.nodes.keys()], ['secondary'], 'active and hidden left the graph');
  assert.deepEqual(mgr.queryJobs(), []);
});

test('active commit without autoComplete: READY, then complete pivots', async () => {
  const g = newCowGraph();
  const mgr = new JobManager(g);
  const events = recordEvents(mgr);
  const base = await addNode(g, { driver: 'memory', size: MiB, 'node-name': 'base' });
  const top = await g.open({ driver: 'test-cow', 'node-name': 'top', backing: 'base' });
  const be = g.createBackend(top, { name: 'vda' });
  await be.write(4096, pattern(0x77, 100 * KiB));
  const job = await startCommit(mgr, { top, base, active: true });
  const ready = await nextEvent(mgr, 'BLOCK_JOB_READY');
  assert.deepEqual(ready, { type: 'commit', device: 'vda', len: ready['len'], offset: ready['offset'], speed: 0 });
  assert.equal(ready['len'], ready['offset']);
  job.complete();
  assert.equal((await job.done).ret, 0);
  assert.equal(be.node, base);
  assert.ok((await base.read(0, MiB)).equals(Buffer.alloc(MiB).fill(0x77, 4096, 4096 + 100 * KiB)));
  assert.ok(events.some((e) => e.name === 'BLOCK_JOB_COMPLETED' && e.data['type'] === 'commit'));
});

test('a failing commit ends with its error and leaves the graph as it was', async () => {
  const g = newCowGraph();
  const mgr = new JobManager(g);
  const events = recordEvents(mgr);
  const size = MiB;
  await addNode(g, { driver: 'memory', size, 'node-name': 'mem' });
  const base = await addNode(g, { driver: 'blkdebug', 'node-name': 'secondary', image: 'mem', 'inject-error': [{ event: 'write_aio', iotype: 'write', errno: 5 }] });
  const active = await g.open({ driver: 'test-cow', 'node-name': 'active', backing: { driver: 'test-cow', 'node-name': 'hidden', 'read-only': false, backing: 'secondary' } });
  const hidden = g.getNode('hidden');
  const be = g.createBackend(active, { name: 'd' });
  await be.write(0, pattern(0x33, 100 * KiB));
  const before = await be.read(0, size);
  const job = await startCommit(mgr, { jobId: 'c', top: active, base, active: true, autoComplete: true });
  const r = await job.done;
  assert.ok(r.ret instanceof BlockError && r.ret.code === 'EIO');
  assert.equal(r.ret.message, 'Input/output error', 'the injected error, not another one');
  assert.ok(events.some((e) => e.name === 'BLOCK_JOB_ERROR' && e.data['operation'] === 'write' && e.data['action'] === 'report'));
  assert.ok(events.some((e) => e.name === 'BLOCK_JOB_COMPLETED' && e.data['error'] === 'Input/output error'));
  assert.equal(be.node, active);
  assert.equal(active.backing, hidden);
  assert.equal(hidden.backing, base);
  assert.deepEqual([...g.nodes.keys()].sort(), ['active', 'hidden', 'mem', 'secondary']);
  assert.ok((await be.read(0, size)).equals(before));
  assert.equal(base.blockers.size, 0);
});

test('intermediate commit: the overlay then backs onto the base and the middle layer drops out', async () => {
  const g = newCowGraph();
  const mgr = new JobManager(g);
  const base = await addNode(g, { driver: 'memory', size: MiB, 'node-name': 'base', 'read-only': true });
  await base.setReadOnly(false);
  await base.write(0, pattern(0x11, MiB));
  await base.setReadOnly(true);
  const top = await g.open({ driver: 'test-cow', 'node-name': 'top', backing: { driver: 'test-cow', 'node-name': 'mid', 'read-only': false, backing: 'base' } });
  const mid = g.getNode('mid');
  await mid.write(64 * KiB, pattern(0x22, 64 * KiB));
  await top.write(0, pattern(0x33, 10));
  const view = await top.read(0, MiB);
  const be = g.createBackend(top, { name: 'd' });
  const job = await startCommit(mgr, { top: mid, base, active: false });
  assert.equal((await job.done).ret, 0);
  await g.settle();
  assert.equal(top.backing, base);
  assert.ok(!g.nodes.has('mid'));
  assert.ok((await be.read(0, MiB)).equals(view));
  assert.ok((await base.read(0, MiB)).equals(pattern(0x11, MiB).fill(0x22, 64 * KiB, 128 * KiB)));
  assert.equal(base.readOnly, true, 'the base is read-only again');
});

test('commit argument errors leave everything unchanged', async () => {
  const g = newCowGraph();
  const mgr = new JobManager(g);
  const base = await addNode(g, { driver: 'memory', size: MiB, 'node-name': 'base' });
  const other = await addNode(g, { driver: 'memory', size: MiB, 'node-name': 'other' });
  const top = await addNode(g, { driver: 'test-cow', 'node-name': 'top', backing: 'base' });
  await assert.rejects(startCommit(mgr, { jobId: 'c', top, base: other, active: true }), { message: "'other' is not in this backing file chain" });
  await assert.rejects(startCommit(mgr, { jobId: 'c', top: base, base, active: true }), { message: 'cannot commit an image into itself' });
  await assert.rejects(startCommit(mgr, { jobId: 'c', top, base, active: false }), { message: "Top image 'top' has no overlay: commit it with active=true" });
  assert.equal(top.backing, base);
});

test('replication data rule: after failover the secondary holds active, else hidden, else its own bytes', async () => {
  // spec section 5.4, scaled down: secondary 0x11; the primary writes 0x22 to the second
  // half (hidden copies 0x11 there); the secondary VM writes 0x33 to the first half
  const g = newCowGraph();
  const mgr = new JobManager(g);
  const size = 4 * MiB;
  const half = size / 2;
  const sec = await addNode(g, { driver: 'memory', size, 'node-name': 'secondary' });
  await sec.write(0, pattern(0x11, size));
  const active = await g.open({ driver: 'test-cow', 'node-name': 'active', backing: { driver: 'test-cow', 'node-name': 'hidden', 'read-only': false, backing: 'secondary' } });
  const hidden = g.getNode('hidden');
  const nbdExport = g.createBackend(sec, { name: 'parent0' });
  const svm = g.createBackend(active, { name: 'colo-disk0' });
  const backup = await startBackup(mgr, { internal: true, source: sec, target: hidden, sync: 'none' });
  await backup.checkpoint();
  await nbdExport.write(half, pattern(0x22, half));
  await svm.write(0, pattern(0x33, half));
  // failover: stop copying, then commit active (through hidden) into the secondary disk
  await backup.cancel();
  assert.equal(hidden.backing, sec);
  const commit = await startCommit(mgr, { internal: true, top: active, base: sec, active: true, autoComplete: true });
  assert.equal((await commit.done).ret, 0);
  assert.equal(svm.node, sec);
  const expected = pattern(0x33, size).fill(0x11, half);
  assert.ok((await sec.read(0, size)).equals(expected));
});
