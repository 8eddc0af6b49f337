// Active commit with flushBehind (replication's failover commit, issue 18): the base's file
// is flushed while the copy runs, not only once at the end; a flush behind that fails fails
// the job (a later fdatasync need not report it again); the bytes are those of a commit
// without it, checked with qemu-io after the graph closed.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { JobManager } from '../../src/jobs/job.js';
import { startCommit } from '../../src/jobs/commit.js';
import { jobsFor } from '../../src/replication/jobs.js';
import { BlockError } from '../../src/errors.js';
import type { BlockGraph } from '../../src/block/graph.js';
import type { BlockNode } from '../../src/block/node.js';
import { newGraph, tempDir } from '../helpers/graph.js';
import { newCowGraph } from '../helpers/cow.js';
import { addNode, haveTool, run } from '../helpers/jobs.js';
import { writeFileSync } from 'node:fs';

const MiB = 1024 * 1024;

function ready(t: { skip(msg: string): void }, g: BlockGraph): boolean {
  // every build registers qcow2: its absence is a broken registry, not a reason to skip
  assert.ok(g.drivers.has('qcow2'), 'the qcow2 driver is in the registry');
  return haveTool(t, 'qemu-img') && haveTool(t, 'qemu-io');
}

/** base <- hidden <- active as replication's secondary has them, the files created by qemu-img. */
async function chain(g: BlockGraph, dir: string, size: number): Promise<{ base: BlockNode; hidden: BlockNode; active: BlockNode; basePath: string }> {
  const basePath = join(dir, 'base.qcow2');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', basePath, String(size)]);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', basePath, '-F', 'qcow2', join(dir, 'hidden.qcow2'), String(size)]);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', join(dir, 'hidden.qcow2'), '-F', 'qcow2', join(dir, 'active.qcow2'), String(size)]);
  const file = (p: string) => ({ driver: 'file', filename: p });
  const base = await g.open({ driver: 'qcow2', 'node-name': 'base', file: file(basePath) }, { monitorOwned: true });
  const active = await g.open({
    driver: 'qcow2',
    'node-name': 'active',
    file: file(join(dir, 'active.qcow2')),
    backing: { driver: 'qcow2', 'node-name': 'hidden', 'read-only': false, file: file(join(dir, 'hidden.qcow2')), backing: 'base' },
  });
  return { base, hidden: g.getNode('hidden'), active, basePath };
}

/** Records the order of data writes (larger than a metadata cluster) and flushes reaching `node`. */
function record(node: BlockNode): string[] {
  const log: string[] = [];
  const write = node.write.bind(node);
  node.write = (offset, data, flags) => {
    if (data.length > 64 * 1024) log.push('w');
    return write(offset, data, flags);
  };
  const flush = node.flush.bind(node);
  node.flush = () => {
    log.push('f');
    return flush();
  };
  return log;
}

/** Flushes that started before the last data write: only a flush behind the copy does that. */
function flushesBeforeLastWrite(log: string[]): number {
  const last = log.lastIndexOf('w');
  return log.slice(0, last).filter((x) => x === 'f').length;
}

async function commitChain(t: { skip(msg: string): void }, viaReplication: boolean): Promise<void> {
  const g = newGraph();
  if (!ready(t, g)) return;
  const dir = tempDir(t as never);
  const size = 32 * MiB;
  const { base, hidden, active, basePath } = await chain(g, dir, size);
  // random data, different in every MiB: a read buffer reused with stale bytes would show
  const model = Buffer.alloc(size);
  const older = randomBytes(16 * MiB);
  await base.write(0, older);
  older.copy(model, 0);
  await hidden.writeZeroes(0, 4 * MiB);
  model.fill(0, 0, 4 * MiB);
  const newer = randomBytes(20 * MiB);
  await active.write(8 * MiB, newer);
  newer.copy(model, 8 * MiB);
  const baseFile = record(base.file!);
  const activeFile = record(active.file!);
  if (viaReplication) {
    const handle = await jobsFor(g).startActiveCommit(active, base);
    assert.equal((await handle.done).ret, 0);
  } else {
    const job = await startCommit(new JobManager(g), { jobId: 'c', top: active, base, active: true, autoComplete: true, flushBehind: 2 * MiB });
    assert.equal((await job.done).ret, 0);
  }
  // at least the one at the start: how many more (one at a time, every 2 MiB copied here)
  // depends on how fast the disk syncs
  assert.ok(flushesBeforeLastWrite(baseFile) >= 1, `the base's file flushed while the copy ran: ${baseFile.join('')}`);
  assert.ok(activeFile.includes('f'), 'the active layer flushed at the start');
  assert.ok((await base.read(0, size)).equals(model));
  await g.closeAll();
  run('qemu-img', ['check', '-q', basePath]);
  const img = join(dir, 'model.raw');
  writeFileSync(img, model);
  run('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'raw', basePath, img]);
  run('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0 0 4M', basePath]);
}

test('active commit with flushBehind flushes the base while copying; the base is byte-exact (qemu-img compare)', async (t) => {
  await commitChain(t, false);
});

test("replication's failover commit flushes the secondary disk behind its copy", async (t) => {
  await commitChain(t, true);
});

test('a flush behind the copy that fails fails the commit, though the final flush succeeds', async () => {
  const g = newCowGraph();
  const mgr = new JobManager(g);
  await addNode(g, { driver: 'memory', size: 8 * MiB, 'node-name': 'mem' });
  // the first flush fails (once), every later one succeeds: only the flush behind sees it
  await addNode(g, { driver: 'blkdebug', 'node-name': 'dbg', image: 'mem', 'inject-error': [{ event: 'flush_to_disk', iotype: 'flush', errno: 5, once: true }] });
  const base = await addNode(g, { driver: 'raw', 'node-name': 'secondary', file: 'dbg' });
  const active = await g.open({ driver: 'test-cow', 'node-name': 'active', backing: { driver: 'test-cow', 'node-name': 'hidden', 'read-only': false, backing: 'secondary' } });
  const be = g.createBackend(active, { name: 'd' });
  await be.write(0, randomBytes(4 * MiB));
  const job = await startCommit(mgr, { jobId: 'c', top: active, base, active: true, autoComplete: true, flushBehind: MiB });
  const r = await job.done;
  assert.ok(r.ret instanceof BlockError && r.ret.code === 'EIO', `the job failed with the flush's error, not ${String(r.ret)}`);
  assert.equal(be.node, active, 'no pivot');
});
