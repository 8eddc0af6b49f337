// Jobs on real qcow2 files, checked byte for byte against a model and with qemu-img.
// These need the qcow2 driver in the registry (until it is merged they skip, saying so) and
// qemu-img (required under CI).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { JobManager } from '../../src/jobs/job.js';
import { startCommit } from '../../src/jobs/commit.js';
import { startBackup } from '../../src/jobs/backup.js';
import { startMirror } from '../../src/jobs/mirror.js';
import { BlockError } from '../../src/errors.js';
import type { BlockGraph } from '../../src/block/graph.js';
import type { Backend } from '../../src/block/backend.js';
import { newGraph, pattern, tempDir } from '../helpers/graph.js';
import { fill, haveTool, rng, run } from '../helpers/jobs.js';

const KiB = 1024;
const MiB = 1024 * KiB;

function ready(t: { skip(msg: string): void }, g: BlockGraph): boolean {
  if (!g.drivers.has('qcow2')) {
    t.skip('the qcow2 driver is not in the registry yet (branch qcow2 not merged)');
    return false;
  }
  return haveTool(t, 'qemu-img');
}

function qcow2(dir: string, name: string, size: number, backing?: string): string {
  const path = join(dir, name);
  const args = ['create', '-q', '-f', 'qcow2'];
  if (backing) args.push('-b', join(dir, backing), '-F', 'qcow2');
  args.push(path, String(size));
  run('qemu-img', args);
  return path;
}

function fileOpts(path: string): Record<string, unknown> {
  return { driver: 'file', filename: path };
}

async function randomWrites(be: Backend, model: Buffer, seed: number, rounds: number): Promise<void> {
  const r = rng(seed);
  const slots = 8;
  const slot = Math.floor(model.length / slots);
  for (let round = 0; round < rounds; round++) {
    const ops: Promise<void>[] = [];
    for (let s = 0; s < slots; s++) {
      const offset = s * slot + r(slot / 2);
      const length = 1 + r(256 * KiB);
      if (r(5) === 0) {
        model.fill(0, offset, offset + length);
        ops.push(be.writeZeroes(offset, length));
      } else {
        const data = fill(seed * 7 + round * 100 + s, length);
        data.copy(model, offset);
        ops.push(be.write(offset, data));
      }
    }
    await Promise.all(ops);
    await new Promise((res) => setImmediate(res));
  }
}

test('qcow2: active commit of active -> hidden -> base under concurrent writes matches the model and qemu-img', async (t) => {
  const g = newGraph();
  if (!ready(t, g)) return;
  const dir = tempDir(t);
  const size = 16 * MiB;
  const basePath = qcow2(dir, 'base.qcow2', size);
  qcow2(dir, 'hidden.qcow2', size, 'base.qcow2');
  qcow2(dir, 'active.qcow2', size, 'hidden.qcow2');
  const mgr = new JobManager(g);
  const base = await g.open({ driver: 'qcow2', 'node-name': 'base', file: fileOpts(basePath) }, { monitorOwned: true });
  const active = await g.open({
    driver: 'qcow2',
    'node-name': 'active',
    file: fileOpts(join(dir, 'active.qcow2')),
    backing: { driver: 'qcow2', 'node-name': 'hidden', 'read-only': false, file: fileOpts(join(dir, 'hidden.qcow2')), backing: 'base' },
  });
  const hidden = g.getNode('hidden');
  const model = Buffer.alloc(size);
  await base.write(0, fill(1, 6 * MiB));
  fill(1, 6 * MiB).copy(model, 0);
  await hidden.write(4 * MiB, pattern(0x44, 4 * MiB));
  model.fill(0x44, 4 * MiB, 8 * MiB);
  await hidden.writeZeroes(MiB, MiB); // an allocated zero region that shadows the base
  model.fill(0, MiB, 2 * MiB);
  const be = g.createBackend(active, { name: 'colo-disk0' });
  await be.write(7 * MiB, pattern(0x33, 3 * MiB));
  model.fill(0x33, 7 * MiB, 10 * MiB);
  assert.ok((await be.read(0, size)).equals(model), 'the chain reads as the model before the commit');
  const job = await startCommit(mgr, { jobId: 'commit0', top: active, base, active: true, autoComplete: true });
  await randomWrites(be, model, 3, 8);
  const r = await job.done;
  assert.equal(r.ret, 0);
  assert.equal(be.node, base);
  assert.ok((await base.read(0, size)).equals(model));
  await g.closeAll();
  run('qemu-img', ['check', '-q', basePath]);
  const modelPath = join(dir, 'model.raw');
  writeFileSync(modelPath, model);
  run('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'raw', basePath, modelPath]);
});

test('qcow2: a commit whose base fails to write ends with EIO and the chain unchanged', async (t) => {
  const g = newGraph();
  if (!ready(t, g)) return;
  const dir = tempDir(t);
  const size = 4 * MiB;
  const basePath = qcow2(dir, 'base.qcow2', size);
  qcow2(dir, 'active.qcow2', size, 'base.qcow2');
  const mgr = new JobManager(g);
  const base = await g.open(
    {
      driver: 'qcow2',
      'node-name': 'base',
      file: { driver: 'blkdebug', image: fileOpts(basePath), 'inject-error': [{ event: 'write_aio', iotype: 'write', errno: 5, state: 2 }], 'set-state': [{ event: 'flush_to_disk', new_state: 2 }] },
    },
    { monitorOwned: true },
  );
  const active = await g.open({ driver: 'qcow2', 'node-name': 'active', file: fileOpts(join(dir, 'active.qcow2')), backing: 'base' });
  const be = g.createBackend(active, { name: 'd' });
  await be.write(0, pattern(0x33, 2 * MiB));
  const view = await be.read(0, size);
  // the error arms once anything flushes the base's file (the job's writes follow)
  await base.flush();
  const job = await startCommit(mgr, { jobId: 'c', top: active, base, active: true, autoComplete: true });
  const r = await job.done;
  assert.ok(r.ret instanceof BlockError && r.ret.code === 'EIO', `ret ${String(r.ret)}`);
  assert.equal(r.ret.message, 'Input/output error', 'the injected error, not another one');
  assert.equal(be.node, active);
  assert.equal(active.backing, base);
  assert.ok((await be.read(0, size)).equals(view));
  assert.deepEqual([...g.nodes.values()].filter((n) => n.driver.name === 'commit_top'), []);
  // the base's file still fails every write: its close-time writeback cannot land, and
  // shutting down says so rather than logging it only
  await assert.rejects(g.closeAll(), (e: unknown) => e instanceof BlockError && e.code === 'EIO' && /^closing base: /.test(e.message));
  assert.equal(g.nodes.size, 0);
});

test('qcow2: replication backup copies old data into the hidden image, zeroes as allocated zero clusters', async (t) => {
  const g = newGraph();
  if (!ready(t, g)) return;
  const dir = tempDir(t);
  const size = 8 * MiB;
  const secPath = qcow2(dir, 'secondary.qcow2', size);
  const hiddenPath = qcow2(dir, 'hidden.qcow2', size, 'secondary.qcow2');
  const mgr = new JobManager(g);
  const sec = await g.open({ driver: 'qcow2', 'node-name': 'secondary', file: fileOpts(secPath) }, { monitorOwned: true });
  await sec.write(0, pattern(0x11, 4 * MiB));
  const hidden = await g.open(
    { driver: 'qcow2', 'node-name': 'hidden', file: fileOpts(hiddenPath), backing: 'secondary', 'read-only': false },
    { monitorOwned: true },
  );
  const exp = g.createBackend(sec, { name: 'parent0' });
  const job = await startBackup(mgr, { internal: true, source: sec, target: hidden, sync: 'none' });
  assert.equal(job.clusterSize, 64 * KiB);
  await exp.write(2 * MiB + 1000, pattern(0x22, 512)); // data below
  await exp.write(6 * MiB + 1000, pattern(0x22, 512)); // never written: zeroes below
  assert.ok((await hidden.read(2 * MiB, 64 * KiB)).equals(pattern(0x11, 64 * KiB)));
  assert.ok((await hidden.read(6 * MiB, 64 * KiB)).equals(Buffer.alloc(64 * KiB)));
  await job.cancel();
  await g.closeAll();
  const map = JSON.parse(run('qemu-img', ['map', '--output=json', hiddenPath])) as Array<{ start: number; length: number; depth: number; zero: boolean; data: boolean }>;
  const own = map.filter((e) => e.depth === 0);
  assert.deepEqual(
    own.map((e) => [e.start, e.length, e.zero]),
    [
      [2 * MiB, 64 * KiB, false],
      [6 * MiB, 64 * KiB, true],
    ],
  );
});

test('qcow2: mirror of a half-zero image into a qcow2 target, then qemu-img compare', async (t) => {
  const g = newGraph();
  if (!ready(t, g)) return;
  const dir = tempDir(t);
  const size = 16 * MiB;
  const srcPath = qcow2(dir, 'src.qcow2', size);
  const dstPath = qcow2(dir, 'dst.qcow2', size);
  const mgr = new JobManager(g);
  const src = await g.open({ driver: 'qcow2', 'node-name': 'src', file: fileOpts(srcPath) }, { monitorOwned: true });
  const dst = await g.open({ driver: 'qcow2', 'node-name': 'dst', file: fileOpts(dstPath) }, { monitorOwned: true });
  const model = Buffer.alloc(size);
  for (let i = 0; i < 16; i += 2) {
    fill(i, MiB).copy(model, i * MiB);
    await src.write(i * MiB, fill(i, MiB));
  }
  const be = g.createBackend(src, { name: 'd' });
  const job = await startMirror(mgr, { source: src, target: dst, sync: 'full', autoComplete: true });
  await randomWrites(be, model, 9, 4);
  assert.equal((await job.done).ret, 0);
  assert.equal(be.node, dst);
  await g.closeAll();
  run('qemu-img', ['check', '-q', dstPath]);
  const modelPath = join(dir, 'model.raw');
  writeFileSync(modelPath, model);
  run('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'raw', dstPath, modelPath]);
});

// The overlay's image header still names the middle layer afterwards (lockstep has no call to
// rewrite a backing file name yet); the graph, and so every read, uses the base.
test('qcow2: intermediate commit re-points the overlay at the base', async (t) => {
  const g = newGraph();
  if (!ready(t, g)) return;
  const dir = tempDir(t);
  const size = 4 * MiB;
  const basePath = qcow2(dir, 'base.qcow2', size);
  qcow2(dir, 'mid.qcow2', size, 'base.qcow2');
  const topPath = qcow2(dir, 'top.qcow2', size, 'mid.qcow2');
  const mgr = new JobManager(g);
  const base = await g.open({ driver: 'qcow2', 'node-name': 'base', 'read-only': true, file: fileOpts(basePath) }, { monitorOwned: true });
  const top = await g.open({
    driver: 'qcow2',
    'node-name': 'top',
    file: fileOpts(topPath),
    backing: { driver: 'qcow2', 'node-name': 'mid', file: fileOpts(join(dir, 'mid.qcow2')), backing: 'base' },
  });
  const mid = g.getNode('mid');
  await mid.setReadOnly(false);
  await mid.write(MiB, pattern(0x22, MiB));
  await mid.setReadOnly(true);
  await top.write(0, pattern(0x33, 4096));
  const view = await top.read(0, size);
  const be = g.createBackend(top, { name: 'd' });
  const job = await startCommit(mgr, { top: mid, base, active: false });
  assert.equal((await job.done).ret, 0);
  await g.settle();
  assert.equal(top.backing, base);
  assert.ok(!g.nodes.has('mid'));
  assert.ok((await be.read(0, size)).equals(view), 'the overlay reads the same through the new backing');
  assert.equal(base.readOnly, true);
  await g.closeAll();
  run('qemu-img', ['check', '-q', basePath]);
});

test('qcow2: failover-shaped commit writes the hidden disk zero clusters as zeroes without reading them', async (t) => {
  const g = newGraph();
  if (!ready(t, g)) return;
  const dir = tempDir(t);
  const size = 16 * MiB;
  const basePath = qcow2(dir, 'base.qcow2', size);
  qcow2(dir, 'hidden.qcow2', size, 'base.qcow2');
  qcow2(dir, 'active.qcow2', size, 'hidden.qcow2');
  const mgr = new JobManager(g);
  const base = await g.open({ driver: 'qcow2', 'node-name': 'base', file: fileOpts(basePath) }, { monitorOwned: true });
  const active = await g.open({
    driver: 'qcow2',
    'node-name': 'active',
    file: fileOpts(join(dir, 'active.qcow2')),
    backing: { driver: 'qcow2', 'node-name': 'hidden', 'read-only': false, file: fileOpts(join(dir, 'hidden.qcow2')), backing: 'base' },
  });
  const hidden = g.getNode('hidden');
  // the primary's writes since the checkpoint landed in the base; the hidden disk holds the
  // checkpoint's content of those clusters, here zeroes (as copy-before-write stores them)
  await base.write(0, fill(2, 8 * MiB));
  await hidden.writeZeroes(0, 6 * MiB);
  await active.write(4 * MiB, pattern(0x33, 4 * MiB));
  const model = fill(2, 8 * MiB);
  model.fill(0, 0, 4 * MiB);
  model.fill(0x33, 4 * MiB, 8 * MiB);
  // what the commit reads through the hidden disk (active's backing reads come here)
  let hiddenRead = 0;
  const read = hidden.read.bind(hidden);
  hidden.read = (offset: number, length: number, ...rest: unknown[]) => {
    hiddenRead += length;
    return (read as (...a: unknown[]) => Promise<Buffer>)(offset, length, ...rest);
  };
  const job = await startCommit(mgr, { jobId: 'commit0', top: active, base, active: true, autoComplete: true });
  const r = await job.done;
  assert.equal(r.ret, 0);
  assert.equal(hiddenRead, 0, 'zero clusters of the hidden disk are known by their status, not read');
  assert.ok((await base.read(0, 8 * MiB)).equals(model));
  assert.ok((await base.read(8 * MiB, 8 * MiB)).equals(Buffer.alloc(8 * MiB)));
  await g.closeAll();
  run('qemu-img', ['check', '-q', basePath]);
});
