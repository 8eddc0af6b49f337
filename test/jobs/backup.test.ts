import { test } from 'node:test';
import assert from 'node:assert/strict';
import { JobManager } from '../../src/jobs/job.js';
import { startBackup } from '../../src/jobs/backup.js';
import { BlockError } from '../../src/errors.js';
import { newGraph, pattern } from '../helpers/graph.js';
import { newCowGraph } from '../helpers/cow.js';
import { addNode, fill, rng } from '../helpers/jobs.js';
import type { Backend } from '../../src/block/backend.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const CLUSTER = 64 * KiB;

/**
 * Random writes, zero writes and discards through `be`, in rounds of concurrent requests
 * on disjoint slots, applied to `model` as well. Returns the set of touched clusters.
 */
async function randomIo(be: Backend, model: Buffer, seed: number, rounds: number, perRound = 8): Promise<Set<number>> {
  const r = rng(seed);
  const touched = new Set<number>();
  const slot = Math.floor(model.length / perRound);
  for (let round = 0; round < rounds; round++) {
    const ops: Promise<void>[] = [];
    for (let s = 0; s < perRound; s++) {
      const offset = s * slot + r(slot - 1);
      const length = 1 + r(Math.min(slot - (offset - s * slot), 200 * KiB));
      const kind = r(10);
      for (let c = Math.floor(offset / CLUSTER); c <= Math.floor((offset + length - 1) / CLUSTER); c++) touched.add(c);
      if (kind < 7) {
        const data = fill(seed * 1000 + round * 10 + s, length);
        data.copy(model, offset);
        ops.push(be.write(offset, data));
      } else if (kind < 9) {
        model.fill(0, offset, offset + length);
        ops.push(be.writeZeroes(offset, length));
      } else {
        // memory nodes discard whole 64 KiB chunks only; keep to aligned discards
        const a = Math.ceil(offset / CLUSTER) * CLUSTER;
        const e = Math.floor((offset + length) / CLUSTER) * CLUSTER;
        if (e > a) {
          model.fill(0, a, e);
          ops.push(be.discard(a, e - a));
        }
      }
    }
    await Promise.all(ops);
  }
  return touched;
}

test('backup sync=none copies each touched cluster once, before the write, and nothing else', async () => {
  const g = newGraph();
  const mgr = new JobManager(g);
  const size = 4 * MiB + 12345; // a short last cluster
  const src = await addNode(g, { driver: 'memory', size, 'node-name': 'src' });
  const dst = await addNode(g, { driver: 'memory', size, 'node-name': 'dst' });
  const initial = fill(7, size);
  await src.write(0, initial);
  const be = g.createBackend(src, { name: 'export0' });
  const job = await startBackup(mgr, { jobId: 'b', source: src, target: dst, sync: 'none' });
  assert.equal(be.node.driver.name, 'copy-before-write');
  assert.equal(job.clusterSize, CLUSTER);
  const model = Buffer.from(initial);
  const touched = await randomIo(be, model, 3, 12);
  assert.ok((await src.read(0, size)).equals(model), 'source holds the new data');
  const target = await dst.read(0, size);
  for (let c = 0; c * CLUSTER < size; c++) {
    const a = c * CLUSTER;
    const e = Math.min(size, a + CLUSTER);
    const expected = touched.has(c) ? initial.subarray(a, e) : Buffer.alloc(e - a);
    assert.ok(target.subarray(a, e).equals(expected), `cluster ${c} (${touched.has(c) ? 'touched' : 'untouched'})`);
  }
  assert.equal(job.copiedClusters, touched.size);
  assert.equal(job.uncopiedClusters, Math.ceil(size / CLUSTER) - touched.size);
  await job.cancel();
  assert.equal(be.node, src, 'the export points at the source again');
  assert.equal(g.nodes.size, 2);
});

test('a failed copy fails the incoming write and leaves the source unchanged', async () => {
  const g = newGraph();
  const mgr = new JobManager(g);
  const src = await addNode(g, { driver: 'memory', size: MiB, 'node-name': 'src' });
  await addNode(g, { driver: 'memory', size: MiB, 'node-name': 'mem' });
  const dst = await addNode(g, {
    driver: 'blkdebug',
    'node-name': 'dst',
    image: 'mem',
    'inject-error': [{ event: 'write_aio', errno: 28, once: true }],
  });
  await src.write(0, pattern(0x11, MiB));
  const be = g.createBackend(src, { name: 'e' });
  const job = await startBackup(mgr, { jobId: 'b', source: src, target: dst, sync: 'none' });
  await assert.rejects(be.write(100, pattern(0x22, 10)), (e: unknown) => e instanceof BlockError && e.code === 'ENOSPC');
  assert.ok((await src.read(0, MiB)).equals(pattern(0x11, MiB)), 'source unchanged');
  assert.equal(job.copiedClusters, 0);
  // the error was injected once: the retry copies and writes
  await be.write(100, pattern(0x22, 10));
  assert.ok((await dst.read(0, CLUSTER)).equals(pattern(0x11, CLUSTER)));
  assert.ok((await src.read(100, 10)).equals(pattern(0x22, 10)));
  assert.equal(job.copiedClusters, 1);
  await job.cancel();
});

test('fleecing chain: readers through active->hidden never see writes made after the checkpoint', async () => {
  const g = newCowGraph();
  const mgr = new JobManager(g);
  const size = 2 * MiB;
  const sec = await addNode(g, { driver: 'memory', size, 'node-name': 'secondary' });
  await sec.write(0, pattern(0x11, size));
  // the hidden disk pauses before reading through to the secondary disk: a write that
  // lands in that window must not be seen
  const hidden = await addNode(g, { driver: 'test-cow', 'node-name': 'hidden', backing: 'secondary', 'backing-read-delay-ms': 2 });
  const active = await addNode(g, { driver: 'test-cow', 'node-name': 'active', backing: 'hidden' });
  const exp = g.createBackend(sec, { name: 'parent0' });
  const job = await startBackup(mgr, { internal: true, source: sec, target: hidden, sync: 'none' });
  // writes from the primary and reads of the secondary VM's view, interleaved
  const r = rng(9);
  for (let round = 0; round < 6; round++) {
    const ops: Promise<unknown>[] = [];
    for (let i = 0; i < 6; i++) {
      const off = r(size - 70 * KiB);
      ops.push(exp.write(off, pattern(0x22, 1 + r(70 * KiB))));
      const roff = r(size - 128 * KiB);
      ops.push(
        active.read(roff, 128 * KiB).then((b) => {
          assert.ok(b.equals(pattern(0x11, 128 * KiB)), `the SVM saw post-checkpoint data at ${roff}`);
        }),
      );
    }
    await Promise.all(ops);
  }
  assert.ok((await active.read(0, size)).equals(pattern(0x11, size)));
  // checkpoint: reset, then the overlays are emptied: the SVM sees the primary's data
  await job.checkpoint();
  assert.equal(job.copiedClusters, 0);
  await hidden.makeEmpty();
  await active.makeEmpty();
  assert.ok((await active.read(0, size)).equals(await sec.read(0, size)));
  await job.cancel();
  assert.equal(exp.node, sec);
  assert.equal(hidden.backing, sec);
});

test('an unwritten cluster is copied as an allocated zero region that shadows the base', async () => {
  const g = newCowGraph();
  const mgr = new JobManager(g);
  const sec = await addNode(g, { driver: 'memory', size: MiB, 'node-name': 'secondary' });
  const hidden = await addNode(g, { driver: 'test-cow', 'node-name': 'hidden', backing: 'secondary' });
  const exp = g.createBackend(sec, { name: 'parent0' });
  const job = await startBackup(mgr, { internal: true, source: sec, target: hidden, sync: 'none' });
  await exp.write(1000, pattern(0x22, 512));
  const s = await hidden.blockStatus(0, MiB);
  assert.deepEqual({ length: s.length, allocated: s.allocated, zero: s.zero }, { length: CLUSTER, allocated: true, zero: true });
  assert.ok((await hidden.read(0, CLUSTER)).equals(Buffer.alloc(CLUSTER)), 'the hidden disk shows the old zeroes');
  await job.cancel();
});

test('checkpoint waits for in-flight writes and their copies', async () => {
  const g = newGraph();
  const mgr = new JobManager(g);
  const src = await addNode(g, { driver: 'memory', size: 4 * MiB, 'node-name': 'src' });
  const dst = await addNode(g, { driver: 'memory', size: 4 * MiB, 'node-name': 'dst' });
  await src.write(0, pattern(0x11, 4 * MiB));
  const be = g.createBackend(src, { name: 'e' });
  const job = await startBackup(mgr, { jobId: 'b', source: src, target: dst, sync: 'none' });
  const writes = [];
  for (let i = 0; i < 16; i++) writes.push(be.write(i * 256 * KiB + 5, pattern(0x22, 100 * KiB)));
  let writesDone = 0;
  for (const w of writes) void w.then(() => writesDone++);
  await job.checkpoint();
  assert.equal(writesDone, 16, 'every write issued before the checkpoint completed first');
  assert.equal(job.copiedClusters, 0, 'and the bitmap was reset after them');
  const t = await dst.read(0, 4 * MiB);
  for (let i = 0; i < 16; i++) assert.ok(t.subarray(i * 256 * KiB, i * 256 * KiB + CLUSTER).equals(pattern(0x11, CLUSTER)));
  // after the checkpoint the same clusters are copied again (new content this time)
  await be.write(5, pattern(0x33, 10));
  assert.ok((await dst.read(0, 10)).equals(pattern(0x22, 10).fill(0x11, 0, 5)));
  await assert.rejects(startBackup(mgr, { jobId: 'b2', source: dst, target: src, sync: 'full' }), {
    message: "Node 'dst' is busy: block device is in use by block job: backup",
  });
  await job.cancel();
});

test('backup sync=full makes a point-in-time copy while writes continue', async () => {
  const g = newGraph();
  const mgr = new JobManager(g);
  const size = 8 * MiB;
  const src = await addNode(g, { driver: 'memory', size, 'node-name': 'src' });
  const dst = await addNode(g, { driver: 'memory', size, 'node-name': 'dst' });
  const initial = fill(5, size);
  initial.fill(0, MiB, 3 * MiB); // some zeroes
  await src.write(0, initial);
  await src.writeZeroes(MiB, 2 * MiB);
  const be = g.createBackend(src, { name: 'e' });
  const job = await startBackup(mgr, { jobId: 'full', source: src, target: dst, sync: 'full', speed: 0 });
  const model = Buffer.from(initial);
  await randomIo(be, model, 11, 6);
  const r = await job.done;
  assert.equal(r.ret, 0);
  assert.ok((await dst.read(0, size)).equals(initial), 'target = source at job start');
  assert.ok((await src.read(0, size)).equals(model));
  assert.equal(be.node, src);
});

test('backup sync=top copies only what the top layer allocated', async () => {
  const g = newCowGraph();
  const mgr = new JobManager(g);
  const base = await addNode(g, { driver: 'memory', size: MiB, 'node-name': 'base' });
  await base.write(0, pattern(0x11, MiB));
  const top = await addNode(g, { driver: 'test-cow', 'node-name': 'top', backing: 'base' });
  await top.write(3 * CLUSTER + 10, pattern(0x22, 10));
  const dst = await addNode(g, { driver: 'memory', size: MiB, 'node-name': 'dst' });
  const job = await startBackup(mgr, { jobId: 't', source: top, target: dst, sync: 'top' });
  assert.equal((await job.done).ret, 0);
  const expected = Buffer.alloc(MiB);
  expected.fill(0x11, 3 * CLUSTER, 4 * CLUSTER).fill(0x22, 3 * CLUSTER + 10, 3 * CLUSTER + 20);
  assert.ok((await dst.read(0, MiB)).equals(expected));
});

test('a failing target with on-target-error=report ends a sync=full backup with BLOCK_JOB_COMPLETED error', async () => {
  const g = newGraph();
  const mgr = new JobManager(g);
  const events: Array<[string, Record<string, unknown>]> = [];
  mgr.on('event', (n: string, d: Record<string, unknown>) => events.push([n, d]));
  const src = await addNode(g, { driver: 'memory', size: MiB, 'node-name': 'src' });
  await addNode(g, { driver: 'memory', size: MiB, 'node-name': 'mem' });
  const dst = await addNode(g, { driver: 'blkdebug', 'node-name': 'dst', image: 'mem', 'inject-error': [{ event: 'write_aio', errno: 5 }] });
  await src.write(0, pattern(1, MiB));
  const job = await startBackup(mgr, { jobId: 'x', source: src, target: dst, sync: 'full' });
  const r = await job.done;
  assert.ok(r.ret instanceof BlockError && r.ret.code === 'EIO');
  const err = events.find(([n]) => n === 'BLOCK_JOB_ERROR');
  assert.deepEqual(err?.[1], { device: 'x', operation: 'write', action: 'report' });
  const done = events.find(([n]) => n === 'BLOCK_JOB_COMPLETED');
  assert.equal(done?.[1]['error'], 'Input/output error');
  assert.deepEqual([...g.nodes.keys()].sort(), ['dst', 'mem', 'src']);
});

test('checkpoint(during) empties the overlays while new writes are held', async () => {
  const g = newCowGraph();
  const mgr = new JobManager(g);
  const size = MiB;
  const sec = await addNode(g, { driver: 'memory', size, 'node-name': 'secondary' });
  await sec.write(0, pattern(0x11, size));
  const hidden = await addNode(g, { driver: 'test-cow', 'node-name': 'hidden', backing: 'secondary' });
  const active = await addNode(g, { driver: 'test-cow', 'node-name': 'active', backing: 'hidden' });
  const exp = g.createBackend(sec, { name: 'parent0' });
  const job = await startBackup(mgr, { internal: true, source: sec, target: hidden, sync: 'none' });
  await exp.write(0, pattern(0x22, 4096)); // before the checkpoint: hidden holds 0x11 there
  const order: string[] = [];
  const cp = job.checkpoint(async () => {
    order.push('empty');
    await hidden.makeEmpty();
    await active.makeEmpty();
  });
  // a write issued once the checkpoint began belongs to the next epoch: its copy must
  // survive the emptying
  await new Promise((r) => setImmediate(r));
  const w = exp.write(2 * CLUSTER, pattern(0x33, 100)).then(() => order.push('write'));
  await Promise.all([cp, w]);
  assert.deepEqual(order, ['empty', 'write']);
  const expected = pattern(0x11, size).fill(0x22, 0, 4096);
  assert.ok((await active.read(0, size)).equals(expected), 'the SVM sees the checkpoint state, not the new write');
  await job.cancel();
});

test('concurrent writers of one cluster: the old content is copied exactly once, before any of them lands', async () => {
  const g = newCowGraph();
  const mgr = new JobManager(g);
  const sec = await addNode(g, { driver: 'memory', size: MiB, 'node-name': 'secondary' });
  const old = fill(21, MiB);
  await sec.write(0, old);
  const hidden = await addNode(g, { driver: 'test-cow', 'node-name': 'hidden', backing: 'secondary', 'backing-read-delay-ms': 1 });
  const exp = g.createBackend(sec, { name: 'parent0' });
  const job = await startBackup(mgr, { internal: true, source: sec, target: hidden, sync: 'none' });
  const writes: Promise<void>[] = [];
  for (let i = 0; i < 32; i++) writes.push(exp.write(CLUSTER + ((i * 2003) % (CLUSTER - 100)), fill(100 + i, 100)));
  // a write spanning two clusters, one of them being copied by the others
  writes.push(exp.write(2 * CLUSTER - 50, fill(7, 100)));
  await Promise.all(writes);
  assert.ok((await hidden.read(CLUSTER, 2 * CLUSTER)).equals(old.subarray(CLUSTER, 3 * CLUSTER)));
  assert.equal(job.copiedClusters, 2);
  assert.equal(job.bytesCopied, 2 * CLUSTER);
  await job.cancel();
});
