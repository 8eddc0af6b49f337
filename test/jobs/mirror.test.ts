import { test } from 'node:test';
import assert from 'node:assert/strict';
import { JobManager } from '../../src/jobs/job.js';
import { startMirror } from '../../src/jobs/mirror.js';
import { BlockError } from '../../src/errors.js';
import { newGraph, pattern } from '../helpers/graph.js';
import { newCowGraph } from '../helpers/cow.js';
import { addNode, fill, nextEvent, recordEvents, rng, statuses, until } from '../helpers/jobs.js';
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
      if (r(4) === 0) {
        model.fill(0, offset, offset + length);
        ops.push(be.writeZeroes(offset, length));
      } else {
        const data = fill(seed + round * 100 + s, length);
        data.copy(model, offset);
        ops.push(be.write(offset, data));
      }
    }
    await Promise.all(ops);
    await new Promise((res) => setImmediate(res));
  }
}

test('mirror sync=full under concurrent writes converges, READY, and complete pivots to the target', async () => {
  const g = newGraph();
  const mgr = new JobManager(g);
  const events = recordEvents(mgr);
  const size = 8 * MiB + 4096;
  const src = await addNode(g, { driver: 'memory', size, 'node-name': 'src' });
  const dst = await addNode(g, { driver: 'memory', size, 'node-name': 'dst' });
  const model = fill(1, size);
  model.fill(0, 2 * MiB, 5 * MiB);
  await src.write(0, model);
  await src.writeZeroes(2 * MiB, 3 * MiB);
  await dst.write(0, pattern(0xee, size)); // garbage the mirror must overwrite, zeroes included
  const be = g.createBackend(src, { name: 'disk0' });
  const job = await startMirror(mgr, { source: src, target: dst, sync: 'full' });
  assert.equal(job.id, 'disk0', 'the job id defaults to the device name');
  const ready = nextEvent(mgr, 'BLOCK_JOB_READY');
  await randomWrites(be, model, 7, 10);
  const readyData = await ready;
  assert.equal(readyData['type'], 'mirror');
  assert.equal(readyData['device'], 'disk0');
  // writes racing with the completion: each lands either before the pivot (and is copied)
  // or after it (and goes to the target directly)
  const racing = randomWrites(be, model, 8, 5);
  job.complete();
  const r = await job.done;
  await racing;
  assert.equal(r.ret, 0);
  assert.equal(be.node, dst, 'the device now uses the target');
  assert.ok((await dst.read(0, size)).equals(model));
  assert.ok((await be.read(0, size)).equals(model));
  assert.deepEqual(statuses(events, 'disk0'), ['created', 'running', 'ready', 'waiting', 'pending', 'concluded', 'null']);
  assert.ok(events.some((e) => e.name === 'BLOCK_JOB_COMPLETED' && e.data['error'] === undefined));
  assert.deepEqual([...g.nodes.keys()].sort(), ['dst', 'src']);
});

test('cancel after READY leaves the target equal to the source and the graph unchanged', async () => {
  const g = newGraph();
  const mgr = new JobManager(g);
  const events = recordEvents(mgr);
  const size = 4 * MiB;
  const src = await addNode(g, { driver: 'memory', size, 'node-name': 'src' });
  const dst = await addNode(g, { driver: 'memory', size, 'node-name': 'dst' });
  const model = fill(2, size);
  await src.write(0, model);
  const be = g.createBackend(src, { name: 'colo-disk0' });
  const job = await startMirror(mgr, { jobId: 'resync', source: src, target: dst, sync: 'full', mode: 'existing' });
  await nextEvent(mgr, 'BLOCK_JOB_READY');
  const writes = randomWrites(be, model, 3, 4);
  await writes;
  job.userCancel(false);
  const r = await job.done;
  assert.equal(r.ret, 0);
  assert.equal(r.cancelled, false, 'a soft cancel after READY is a completion without pivot');
  assert.ok(events.some((e) => e.name === 'BLOCK_JOB_COMPLETED'));
  assert.ok(!events.some((e) => e.name === 'BLOCK_JOB_CANCELLED'));
  assert.equal(be.node, src);
  assert.ok((await dst.read(0, size)).equals(model));
  assert.ok((await src.read(0, size)).equals(model));
});

test('force cancel before READY emits BLOCK_JOB_CANCELLED and removes the filter', async () => {
  const g = newGraph();
  const mgr = new JobManager(g);
  const events = recordEvents(mgr);
  const src = await addNode(g, { driver: 'memory', size: 64 * MiB, 'node-name': 'src' });
  const dst = await addNode(g, { driver: 'memory', size: 64 * MiB, 'node-name': 'dst' });
  await src.write(0, fill(3, 64 * MiB));
  const be = g.createBackend(src, { name: 'd' });
  const job = await startMirror(mgr, { jobId: 'm', source: src, target: dst, sync: 'full', speed: 1 * MiB });
  await until(() => job.progressCurrent > 0, 'first copy');
  const r = await job.cancel(true);
  assert.equal(r.cancelled, true);
  assert.ok(r.ret !== 0 && r.ret.code === 'ECANCELED');
  assert.ok(events.some((e) => e.name === 'BLOCK_JOB_CANCELLED'));
  assert.equal(be.node, src);
  assert.deepEqual([...g.nodes.keys()].sort(), ['dst', 'src']);
});

test('zero runs are written as zeroes, and skipped where the target reads zeroes already', async () => {
  const g = newGraph();
  const mgr = new JobManager(g);
  const size = 8 * MiB;
  const src = await addNode(g, { driver: 'memory', size, 'node-name': 'src' });
  const model = Buffer.alloc(size);
  for (let i = 0; i < 8; i += 2) model.fill(i + 1, i * MiB, (i + 1) * MiB); // half zeroes
  await src.write(0, model);
  for (let i = 1; i < 8; i += 2) await src.writeZeroes(i * MiB, MiB);
  // the target fails every write-zeroes: the mirror must not issue any
  await addNode(g, { driver: 'memory', size, 'node-name': 'mem' });
  const dst = await addNode(g, {
    driver: 'blkdebug',
    'node-name': 'dst',
    image: 'mem',
    'inject-error': [{ event: 'none', iotype: 'write-zeroes', errno: 5 }],
  });
  const job = await startMirror(mgr, { jobId: 'z', source: src, target: dst, sync: 'full', autoComplete: true });
  const r = await job.done;
  assert.equal(r.ret, 0);
  assert.ok((await dst.read(0, size)).equals(model));
});

test('a failing target: on-target-error=stop pauses with BLOCK_JOB_ERROR, resume retries; report fails the job', async () => {
  const g = newGraph();
  const mgr = new JobManager(g);
  const events = recordEvents(mgr);
  const size = 2 * MiB;
  const src = await addNode(g, { driver: 'memory', size, 'node-name': 'src' });
  await src.write(0, fill(4, size));
  await addNode(g, { driver: 'memory', size, 'node-name': 'mem' });
  const dst = await addNode(g, { driver: 'blkdebug', 'node-name': 'dst', image: 'mem', 'inject-error': [{ event: 'write_aio', errno: 28, once: true }] });
  const job = await startMirror(mgr, { jobId: 's', source: src, target: dst, sync: 'full', onTargetError: 'enospc' });
  const err = await nextEvent(mgr, 'BLOCK_JOB_ERROR');
  assert.deepEqual(err, { device: 's', operation: 'write', action: 'stop' });
  await until(() => job.status === 'paused', 'paused');
  const info = mgr.queryBlockJobs()[0]!;
  assert.equal(info['io-status'], 'nospace');
  assert.equal(info.paused, true);
  job.resume();
  await nextEvent(mgr, 'BLOCK_JOB_READY');
  job.complete();
  assert.equal((await job.done).ret, 0);
  assert.ok((await dst.read(0, size)).equals(fill(4, size)));

  // report: the job ends with the error and the graph is as it was
  const src2 = await addNode(g, { driver: 'memory', size, 'node-name': 'src2' });
  await src2.write(0, fill(5, size));
  await addNode(g, { driver: 'memory', size, 'node-name': 'mem2' });
  const dst2 = await addNode(g, { driver: 'blkdebug', 'node-name': 'dst2', image: 'mem2', 'inject-error': [{ event: 'write_aio', errno: 5 }] });
  const be2 = g.createBackend(src2, { name: 'd2' });
  const job2 = await startMirror(mgr, { source: src2, target: dst2, sync: 'full' });
  const r2 = await job2.done;
  assert.ok(r2.ret instanceof BlockError && r2.ret.code === 'EIO');
  assert.ok(events.some((e) => e.name === 'BLOCK_JOB_ERROR' && e.data['device'] === 'd2' && e.data['action'] === 'report'));
  assert.ok(events.some((e) => e.name === 'BLOCK_JOB_COMPLETED' && e.data['device'] === 'd2' && e.data['error'] === 'Input/output error'));
  assert.equal(be2.node, src2);
});

test('mirror sync=top copies what the top layer allocated; sync=none only new writes', async () => {
  const g = newCowGraph();
  const mgr = new JobManager(g);
  const base = await addNode(g, { driver: 'memory', size: MiB, 'node-name': 'base' });
  await base.write(0, pattern(0x11, MiB));
  const top = await addNode(g, { driver: 'test-cow', 'node-name': 'top', backing: 'base' });
  await top.write(128 * KiB, pattern(0x22, 64 * KiB));
  // the target overlay shares the base, as a user's mode=existing target would
  const dst = await addNode(g, { driver: 'test-cow', 'node-name': 'dst', backing: 'base' });
  const job = await startMirror(mgr, { jobId: 't', source: top, target: dst, sync: 'top', autoComplete: true });
  assert.equal((await job.done).ret, 0);
  assert.ok((await dst.read(0, MiB)).equals(await top.read(0, MiB)));
  const s = await dst.blockStatus(0, MiB);
  assert.equal(s.allocated, false, 'unallocated ranges stay unallocated in the target');

  const src = await addNode(g, { driver: 'memory', size: MiB, 'node-name': 'src' });
  await src.write(0, pattern(0x55, MiB));
  const empty = await addNode(g, { driver: 'memory', size: MiB, 'node-name': 'empty' });
  const be = g.createBackend(src, { name: 'n' });
  const j2 = await startMirror(mgr, { source: src, target: empty, sync: 'none' });
  await nextEvent(mgr, 'BLOCK_JOB_READY');
  await be.write(1000, pattern(0x66, 10));
  j2.complete();
  assert.equal((await j2.done).ret, 0);
  const expected = Buffer.alloc(MiB);
  // the written range is copied at the bitmap's granularity (64 KiB)
  expected.fill(0x55, 0, 64 * KiB).fill(0x66, 1000, 1010);
  assert.ok((await empty.read(0, MiB)).equals(expected));
});

test('mirror argument errors', async () => {
  const g = newGraph();
  const mgr = new JobManager(g);
  const src = await addNode(g, { driver: 'memory', size: MiB, 'node-name': 'src' });
  const small = await addNode(g, { driver: 'memory', size: 4096, 'node-name': 'small' });
  await assert.rejects(startMirror(mgr, { jobId: 'a', source: src, target: src, sync: 'full' }), { message: "Can't mirror node into itself" });
  // accepted, and the job fails at its start (QEMU's mirror_run)
  const j = await startMirror(mgr, { jobId: 'a', source: src, target: small, sync: 'full' });
  const r = await j.done;
  assert.ok(r.ret !== 0 && r.ret.code === 'EINVAL' && r.ret.message === 'Source and target image have different sizes', String(r.ret));
  await assert.rejects(startMirror(mgr, { jobId: 'a', source: small, target: src, sync: 'full', granularity: 1000 }), {
    message: 'Granularity must be a power of 2',
  });
  await assert.rejects(startMirror(mgr, { jobId: 'a', source: small, target: src, sync: 'bogus' as never }), {
    message: "Parameter 'sync' does not accept value 'bogus'",
  });
  assert.deepEqual([...g.nodes.keys()].sort(), ['small', 'src']);
});

test('pause and resume: paused before READY, standby after; speed can change at run time', async () => {
  const g = newGraph();
  const mgr = new JobManager(g);
  const events = recordEvents(mgr);
  const size = 16 * MiB;
  const src = await addNode(g, { driver: 'memory', size, 'node-name': 'src' });
  const dst = await addNode(g, { driver: 'memory', size, 'node-name': 'dst' });
  await src.write(0, fill(6, size));
  // 1 byte per second: after the first chunk the job waits for the limit
  const job = await startMirror(mgr, { jobId: 'p', source: src, target: dst, sync: 'full', speed: 1 });
  await until(() => job.progressCurrent > 0, 'first chunk');
  const first = job.progressCurrent;
  for (let i = 0; i < 50; i++) await new Promise((r) => setImmediate(r));
  assert.equal(job.progressCurrent, first, 'the speed limit holds the job');
  job.pause();
  await until(() => job.status === 'paused', 'paused');
  job.setSpeed(0);
  for (let i = 0; i < 50; i++) await new Promise((r) => setImmediate(r));
  assert.equal(job.progressCurrent, first, 'a paused job does not copy');
  job.resume();
  await nextEvent(mgr, 'BLOCK_JOB_READY');
  job.pause();
  await until(() => job.status === 'standby', 'standby');
  job.resume();
  await until(() => job.status === 'ready', 'ready again');
  job.complete();
  assert.equal((await job.done).ret, 0);
  assert.deepEqual(statuses(events, 'p'), ['created', 'running', 'paused', 'running', 'ready', 'standby', 'ready', 'waiting', 'pending', 'concluded', 'null']);
  assert.ok((await dst.read(0, size)).equals(fill(6, size)));
});

test('a source read error with on-source-error=ignore is reported and retried', async () => {
  const g = newGraph();
  const mgr = new JobManager(g);
  const events = recordEvents(mgr);
  const size = MiB;
  await addNode(g, { driver: 'memory', size, 'node-name': 'mem' });
  const src = await addNode(g, { driver: 'blkdebug', 'node-name': 'src', image: 'mem', 'inject-error': [{ event: 'read_aio', errno: 5, once: true, iotype: 'read' }] });
  await src.write(0, fill(8, size));
  const dst = await addNode(g, { driver: 'memory', size, 'node-name': 'dst' });
  const job = await startMirror(mgr, { jobId: 'i', source: src, target: dst, sync: 'full', onSourceError: 'ignore', autoComplete: true });
  assert.equal((await job.done).ret, 0);
  assert.deepEqual(events.find((e) => e.name === 'BLOCK_JOB_ERROR')?.data, { device: 'i', operation: 'read', action: 'ignore' });
  assert.ok((await dst.read(0, size)).equals(fill(8, size)));
});

test('a write in flight on the source when the mirror starts is not lost', async () => {
  const g = newCowGraph();
  const mgr = new JobManager(g);
  const base = await addNode(g, { driver: 'memory', size: MiB, 'node-name': 'base' });
  await base.write(0, pattern(0x11, MiB));
  // a partial-cluster write to this overlay first reads the backing, slowly
  const src = await addNode(g, { driver: 'test-cow', 'node-name': 'src', backing: 'base', 'backing-read-delay-ms': 20 });
  const dst = await addNode(g, { driver: 'memory', size: MiB, 'node-name': 'dst' });
  const be = g.createBackend(src, { name: 'd' });
  const w = be.write(100, pattern(0x22, 100));
  const job = await startMirror(mgr, { source: src, target: dst, sync: 'full', autoComplete: true });
  await w;
  assert.equal((await job.done).ret, 0);
  assert.ok((await dst.read(0, MiB)).equals(pattern(0x11, MiB).fill(0x22, 100, 200)));
});
