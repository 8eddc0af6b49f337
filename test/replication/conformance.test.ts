// Conformance tests of replication as docs/replication.md describes it ("The two graphs",
// "Stages", "Errors you can meet"): items 1 to 9 are the behaviours kept from QEMU 7.2, and
// one test per lockstep decision, numbered as in that doc's "the decisions". Every data check
// is an exact byte comparison.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { execFileSync } from 'node:child_process';
import { BlockGraph } from '../../src/block/graph.js';
import { createRegistry } from '../../src/block/registry.js';
import type { Backend } from '../../src/block/backend.js';
import type { BlockNode } from '../../src/block/node.js';
import { createQcow2 } from '../../src/block/drivers/qcow2/create.js';
import { replicationRegistry, type ReplicationRegistry } from '../../src/replication/registry.js';
import { replicationStateOf, type ReplicationState } from '../../src/block/filters/replication/filter.js';
import { jobManagerOf, wireReplicationJobs } from '../../src/replication/jobs.js';
import { tempDir } from '../helpers/graph.js';
import { faultDriver, faultControl } from '../helpers/fault-driver.js';
import { primaryFixture } from '../helpers/replication.js';

const MiB = 1024 * 1024;
const KiB = 1024;
const SIZE = 8 * MiB;
const HALF = SIZE / 2;

interface Secondary {
  graph: BlockGraph;
  dir: string;
  top: Backend;
  /** the secondary disk's user backend: stands in for its NBD export */
  local: Backend;
  localNode: BlockNode;
  repl: BlockNode;
  state: ReplicationState;
  reg: ReplicationRegistry;
  active: BlockNode;
  hidden: BlockNode;
}

async function secondary(
  t: { after(fn: () => void): void },
  opts: {
    fill?: number;
    faultSecondary?: boolean;
    topId?: string;
    name?: string;
    graph?: BlockGraph;
    dir?: string;
    /** x-copy-unit, and the hidden disk's cluster size (hiddenCluster overrides it) */
    copyUnit?: number;
    hiddenCluster?: number;
  } = {},
): Promise<Secondary> {
  const dir = opts.dir ?? tempDir(t);
  const p = opts.name ?? 's';
  const files = { local: join(dir, `${p}-local.qcow2`), active: join(dir, `${p}-active.qcow2`), hidden: join(dir, `${p}-hidden.qcow2`) };
  const hiddenCluster = opts.hiddenCluster ?? opts.copyUnit;
  for (const [k, f] of Object.entries(files)) {
    await createQcow2(f, { size: SIZE, ...(k === 'hidden' && hiddenCluster !== undefined ? { clusterSize: hiddenCluster } : {}) });
  }
  const graph = opts.graph ?? new BlockGraph(createRegistry([faultDriver]));
  const protocol = { driver: 'file', filename: files.local };
  const localNode = await graph.open({
    driver: 'qcow2',
    'node-name': `${p}-disk`,
    file: opts.faultSecondary ? { driver: 'test-fault', 'node-name': `${p}-fault`, file: protocol } : protocol,
  });
  const local = graph.createBackend(localNode, { name: `${p}-export` });
  if (opts.fill !== undefined) await local.write(0, Buffer.alloc(SIZE, opts.fill));
  const repl = await graph.open({
    driver: 'replication',
    'node-name': `${p}-repl`,
    mode: 'secondary',
    'top-id': opts.topId ?? `${p}-top`,
    ...(opts.copyUnit !== undefined ? { 'x-copy-unit': opts.copyUnit } : {}),
    file: {
      driver: 'qcow2',
      'node-name': `${p}-active`,
      file: { driver: 'file', filename: files.active },
      backing: { driver: 'qcow2', 'node-name': `${p}-hidden`, file: { driver: 'file', filename: files.hidden }, backing: `${p}-disk` },
    },
  });
  const top = graph.createBackend(repl, { name: `${p}-top` });
  t.after(() => graph.closeAll());
  return {
    graph,
    dir,
    top,
    local,
    localNode,
    repl,
    state: replicationStateOf(repl)!,
    reg: replicationRegistry(graph),
    active: graph.getNode(`${p}-active`),
    hidden: graph.getNode(`${p}-hidden`),
  };
}

function filled(length: number, byte: number): Buffer {
  return Buffer.alloc(length, byte);
}

async function expectBytes(b: Backend | BlockNode, offset: number, length: number, byte: number): Promise<void> {
  const got = await b.read(offset, length);
  const at = got.findIndex((x) => x !== byte);
  assert.equal(at, -1, `byte at ${offset + at} is 0x${got[at]?.toString(16)}, expected 0x${byte.toString(16)}`);
}

/** Allocated runs of a node's own layer, as [offset, length] pairs. */
async function allocation(n: BlockNode): Promise<Array<[number, number]>> {
  const out: Array<[number, number]> = [];
  for (let pos = 0; pos < n.getLength(); ) {
    const s = await n.blockStatus(pos, n.getLength() - pos);
    if (s.allocated) {
      const last = out[out.length - 1];
      if (last && last[0] + last[1] === pos) last[1] += s.length;
      else out.push([pos, s.length]);
    }
    pos += s.length;
  }
  return out;
}

// ---- item 1: the data rule after failover ------------------------------------------

test('failover: the secondary disk holds active, else hidden, else its own bytes (0x33 / 0x11)', async (t) => {
  const s = await secondary(t, { fill: 0x11 });
  await s.reg.startAll('secondary');
  await s.local.write(HALF, filled(HALF, 0x22)); // the primary's writes
  await s.top.write(0, filled(HALF, 0x33)); // the secondary's own writes
  await s.reg.stopAll(true);
  await expectBytes(s.top, 0, HALF, 0x33);
  await expectBytes(s.top, HALF, HALF, 0x11); // during the commit already
  await s.state.waitFailover();
  await s.graph.settle();
  assert.equal(s.state.stage, 'done');
  await expectBytes(s.localNode, 0, HALF, 0x33);
  await expectBytes(s.localNode, HALF, HALF, 0x11);
  // the replication node now reads and writes the secondary disk directly
  assert.equal(s.repl.file, s.localNode);
  assert.equal(s.graph.lookup('s-active'), null);
  assert.equal(s.graph.lookup('s-hidden'), null);
});

// ---- item 2 with decision 3 ------------------------------------------------------------

test('decision 3: get_error is clean right after a failover stop and after the commit', async (t) => {
  const s = await secondary(t, { fill: 0x11 });
  await s.reg.startAll('secondary');
  await s.local.write(0, filled(MiB, 0x22));
  await s.reg.stopAll(true);
  await s.reg.getErrorAll();
  await s.state.waitFailover();
  await s.reg.getErrorAll();
});

// ---- item 3 with decision 2 ------------------------------------------------------------

test('decision 2: stop(failover=false) checkpoints for real, succeeds and ends in DONE', async (t) => {
  const s = await secondary(t, { fill: 0x11 });
  await s.reg.startAll('secondary');
  await s.local.write(HALF, filled(HALF, 0x22));
  await s.top.write(0, filled(HALF, 0x33));
  await s.reg.stopAll(false);
  assert.equal(s.state.stage, 'done');
  await s.reg.getErrorAll();
  assert.deepEqual(await allocation(s.active), []);
  assert.deepEqual(await allocation(s.hidden), []);
  // the view is now the secondary disk: the primary's data, the secondary's writes dropped
  await expectBytes(s.top, 0, HALF, 0x11);
  await expectBytes(s.top, HALF, HALF, 0x22);
  // and copying has stopped: a later primary write is not copied into hidden
  await s.local.write(0, filled(4 * KiB, 0x44));
  assert.deepEqual(await allocation(s.hidden), []);
});

// ---- item 4: copy granularity -------------------------------------------------------

test('copy-before-write copies the enclosing 64 KiB cluster once per checkpoint', async (t) => {
  const s = await secondary(t, { fill: 0x11 });
  await s.reg.startAll('secondary');
  const at = 2 * MiB + 1000;
  await s.local.write(at, filled(512, 0x22));
  assert.deepEqual(await allocation(s.hidden), [[2 * MiB, 64 * KiB]]);
  await s.local.write(at, filled(512, 0x23)); // not copied again
  await expectBytes(s.top, 2 * MiB, 64 * KiB, 0x11);
  await expectBytes(s.localNode, at, 512, 0x23);
  await s.reg.doCheckpointAll();
  assert.deepEqual(await allocation(s.hidden), []);
  await expectBytes(s.top, at, 512, 0x23);
  await s.local.write(at, filled(512, 0x24)); // copied again after the checkpoint
  assert.deepEqual(await allocation(s.hidden), [[2 * MiB, 64 * KiB]]);
  await expectBytes(s.top, at, 512, 0x23);
});

// ---- lockstep's x-copy-unit: a smaller copy unit over a hidden disk of that cluster size -----

test('x-copy-unit 4 KiB: each write copies its own 4 KiB units once per checkpoint, and failover recovers the checkpoint plus the secondary\'s writes exactly', async (t) => {
  const s = await secondary(t, { fill: 0x11, copyUnit: 4 * KiB });
  await s.reg.startAll('secondary');
  assert.equal(s.hidden.impl.clusterSize, 4 * KiB);
  // 512 bytes inside one unit, then 100 bytes across the boundary of two
  await s.local.write(2 * MiB + 1000, filled(512, 0x22));
  await s.local.write(3 * MiB - 50, filled(100, 0x23));
  assert.deepEqual(await allocation(s.hidden), [[2 * MiB, 4 * KiB], [3 * MiB - 4 * KiB, 8 * KiB]]);
  await s.local.write(2 * MiB + 1000, filled(512, 0x24)); // not copied again
  await expectBytes(s.top, 2 * MiB, 4 * KiB, 0x11);
  await expectBytes(s.top, 3 * MiB - 4 * KiB, 8 * KiB, 0x11);
  await s.reg.doCheckpointAll();
  assert.deepEqual(await allocation(s.hidden), []);
  // the disk at this checkpoint, and the rule after failover: checkpoint + the secondary's writes
  const want = await s.localNode.read(0, SIZE);
  await s.local.write(2 * MiB + 3000, filled(2000, 0x25)); // forwarded after the checkpoint: lost at failover
  await s.local.write(5 * MiB + 4095, filled(2, 0x26));
  await s.top.write(2 * MiB + 3500, filled(100, 0x33)); // the secondary's own: kept
  await s.top.write(6 * MiB + 10, filled(70_000, 0x34));
  filled(100, 0x33).copy(want, 2 * MiB + 3500);
  filled(70_000, 0x34).copy(want, 6 * MiB + 10);
  assert.deepEqual(await allocation(s.hidden), [[2 * MiB, 8 * KiB], [5 * MiB, 8 * KiB]]);
  assert.ok((await s.top.read(0, SIZE)).equals(want), 'the secondary view before failover');
  await s.reg.stopAll(true);
  await s.state.waitFailover();
  await s.graph.settle();
  assert.equal(s.state.stage, 'done');
  const got = await s.localNode.read(0, SIZE);
  assert.equal(got.findIndex((b, i) => b !== want[i]), -1, 'the recovered disk');
  await s.graph.closeAll();
  for (const n of ['s-hidden.qcow2', 's-active.qcow2', 's-local.qcow2']) execFileSync('qemu-img', ['check', '-q', join(s.dir, n)]);
});

test('x-copy-unit below the hidden disk\'s cluster size is refused at open, leaving nothing behind', async (t) => {
  const g = new BlockGraph(createRegistry());
  // the secondary disk stays open in it: closed here, not left holding its lock
  t.after(() => g.closeAll());
  await assert.rejects(secondary(t, { graph: g, fill: 0x11, copyUnit: 4 * KiB, hiddenCluster: 64 * KiB }), {
    name: 'InvalidArgumentError',
    message: "copy unit 4096 is smaller than the cluster size 65536 of target 's-hidden': a partial-cluster copy would fill the rest of the cluster from the target's backing",
  });
  await g.settle();
  // only the secondary disk and its file remain
  assert.deepEqual([...g.nodes.values()].map((n) => n.driver.name).sort(), ['file', 'qcow2']);
  assert.ok(g.lookup('s-disk'));
  const graph = new BlockGraph(createRegistry());
  const file = { driver: 'memory', size: 1 * MiB };
  await assert.rejects(graph.open({ driver: 'replication', mode: 'primary', 'x-copy-unit': 4096, file }), {
    message: "Parameter 'x-copy-unit' is only for mode 'secondary'",
  });
  await assert.rejects(graph.open({ driver: 'replication', mode: 'secondary', 'top-id': 'x', 'x-copy-unit': 3000, file }), {
    message: "Parameter 'x-copy-unit': copy unit 3000 must be a power of two from 4096 to 4194304 bytes",
  });
  await graph.settle();
  assert.equal(graph.nodes.size, 0);
});

test('x-copy-unit: a hidden disk swapped for one of larger clusters before start makes start fail and leave nothing behind', async (t) => {
  const s = await secondary(t, { fill: 0x11, copyUnit: 4 * KiB });
  // the check at open passed; a start over a hidden disk of 64 KiB clusters must not run
  const big = join(s.dir, 'big-hidden.qcow2');
  await createQcow2(big, { size: SIZE });
  await s.graph.open({ driver: 'qcow2', 'node-name': 'big', file: { driver: 'file', filename: big }, backing: 's-disk' });
  s.graph.replaceChild(s.active, 'backing', s.graph.getNode('big'));
  await assert.rejects(s.reg.startAll('secondary'), /copy unit 4096 is smaller than the cluster size 65536 of target 'big'/);
  assert.equal(s.state.stage, 'none');
});

// ---- item 5: zero content still shadows -----------------------------------------------

test('a primary write into a never-written area makes the secondary read zeroes there', async (t) => {
  const s = await secondary(t); // secondary disk left unallocated
  await s.reg.startAll('secondary');
  await s.local.write(0, filled(4 * KiB, 0x22));
  assert.deepEqual(await allocation(s.hidden), [[0, 64 * KiB]]);
  await expectBytes(s.top, 0, 64 * KiB, 0x00);
  await expectBytes(s.localNode, 0, 4 * KiB, 0x22);
});

// ---- item 6: sticky primary errors ------------------------------------------------------

const primary = (t: { after(fn: () => unknown): void }) => primaryFixture(t, SIZE);

test('primary: a failed forward succeeds, then get_error reports it until stop', async (t) => {
  const p = await primary(t);
  await assert.rejects(p.reg.getErrorAll(), { message: 'Block replication is not running' });
  await p.reg.startAll('primary');
  p.fault.failWrites = 'EIO';
  await p.top.write(0, filled(4096, 0x55));
  await assert.rejects(p.reg.getErrorAll(), { message: 'I/O error occurred' });
  p.fault.failWrites = null;
  await p.top.write(0, filled(4096, 0x56));
  await p.reg.doCheckpointAll();
  await assert.rejects(p.reg.getErrorAll(), { message: 'I/O error occurred' });
  await p.reg.stopAll(false);
  await p.reg.getErrorAll();
  // after DONE writes fail with EIO and are not recorded
  await assert.rejects(p.top.write(0, filled(512, 1)), { code: 'EIO' });
  await p.reg.getErrorAll();
});

// ---- item 7: the control table, every reachable cell with its message ----------------

test('control operations in every stage, both modes, with exact messages', async (t) => {
  // primary, NONE
  const p = await primary(t);
  const ps = replicationStateOf(p.graph.getNode('p-repl'))!;
  await ps.doCheckpoint(); // no-op in every stage
  await assert.rejects(ps.stop(false), { message: 'Block replication is not running' });
  await assert.rejects(ps.stop(true), { message: 'Block replication is not running' });
  await assert.rejects(ps.start('secondary'), { message: "The parameter mode's value is invalid, needs 0, but got 1" });
  await assert.rejects(Promise.resolve().then(() => ps.getError()), { message: 'Block replication is not running' });
  // primary, RUNNING
  await ps.start('primary');
  assert.equal(ps.stage, 'running');
  await assert.rejects(ps.start('primary'), { message: 'Block replication is running or done' });
  await assert.rejects(ps.start('secondary'), { message: 'Block replication is running or done' });
  await ps.doCheckpoint();
  ps.getError();
  await assert.rejects(p.top.read(0, 512), { code: 'EIO' });
  // primary, DONE: everything ignored
  await ps.stop(true);
  assert.equal(ps.stage, 'done');
  await ps.start('primary');
  await ps.start('secondary');
  await ps.doCheckpoint();
  await ps.stop(false);
  ps.getError();
  assert.equal(ps.stage, 'done');

  // secondary, NONE
  const s = await secondary(t, { fill: 0x11 });
  await assert.rejects(s.state.doCheckpoint(), { message: 'Backup job was cancelled unexpectedly' });
  await assert.rejects(s.state.stop(false), { message: 'Block replication is not running' });
  await assert.rejects(s.state.start('primary'), { message: "The parameter mode's value is invalid, needs 1, but got 0" });
  assert.throws(() => s.state.getError(), { message: 'Block replication is not running' });
  // secondary, RUNNING
  await s.state.start('secondary');
  await assert.rejects(s.state.start('secondary'), { message: 'Block replication is running or done' });
  await assert.rejects(s.state.start('primary'), { message: 'Block replication is running or done' });
  s.state.getError();
  await s.state.doCheckpoint();
  // the top node is busy while replication runs
  assert.throws(() => s.repl.checkNotBlocked(), { message: "Node 's-repl' is busy: Block device is in use by internal backup job" });
  // secondary, FAILOVER then DONE: ignored
  await s.state.stop(true);
  await s.state.start('secondary');
  await s.state.doCheckpoint();
  await s.state.stop(false);
  await s.state.waitFailover();
  assert.equal(s.state.stage, 'done');
  s.repl.checkNotBlocked();
  await s.state.start('primary');
  await s.state.doCheckpoint();
  await s.state.stop(true);
  s.state.getError();
});

// ---- item 8: FAILOVER_FAILED routing ----------------------------------------------------

test('a failed failover commit routes writes by allocation and reports the error', async (t) => {
  const s = await secondary(t, { fill: 0x11, faultSecondary: true });
  await s.reg.startAll('secondary');
  await s.local.write(HALF, filled(MiB, 0x22)); // hidden holds [HALF, HALF+1M)
  await s.top.write(0, filled(MiB, 0x33)); // active holds [0, 1M)
  faultControl(s.graph.getNode('s-fault')).failWrites = 'EIO';
  await s.reg.stopAll(true);
  await s.state.waitFailover();
  assert.equal(s.state.stage, 'failover-failed');
  await assert.rejects(s.reg.getErrorAll(), { message: 'I/O error occurred' });
  await assert.rejects(s.state.start('secondary'), { message: 'Block replication is running or done' });
  await assert.rejects(s.state.doCheckpoint(), { message: 'Backup job was cancelled unexpectedly' });
  await assert.rejects(s.state.stop(false), { message: 'Block replication is not running' });
  // a range the overlays own (hidden) is written to the active disk
  await s.top.write(HALF, filled(64 * KiB, 0x44));
  const activeAlloc = await allocation(s.active);
  assert.ok(activeAlloc.some(([o, l]) => o <= HALF && o + l >= HALF + 64 * KiB), 'hidden-owned write landed in active');
  await expectBytes(s.top, HALF, 64 * KiB, 0x44);
  // an unallocated range goes to the failing secondary disk
  await assert.rejects(s.top.write(6 * MiB, filled(4096, 0x45)), { code: 'EIO' });
  // reads still see active over hidden over secondary
  await expectBytes(s.top, 0, MiB, 0x33);
  await expectBytes(s.top, HALF + 64 * KiB, MiB - 64 * KiB, 0x11);
  // the disk heals, so that closing the graph can write its cached tables back (a close
  // that cannot is an error of its own)
  faultControl(s.graph.getNode('s-fault')).failWrites = null;
});

// ---- item 9 and decision 7: registry order and all-or-nothing start ---------------------

test('decision 7: start_all rolls back every node it started when one fails, and a retry works', async (t) => {
  const dir = tempDir(t);
  const graph = new BlockGraph(createRegistry([faultDriver]));
  const older = await secondary(t, { fill: 0x11, name: 'a', topId: 'nowhere', graph, dir });
  const newer = await secondary(t, { fill: 0x11, name: 'b', graph, dir });
  const reg = replicationRegistry(graph);
  assert.deepEqual(reg.list().map((s) => s.node.name), ['b-repl', 'a-repl']); // newest first
  await assert.rejects(reg.startAll('secondary'), { message: 'No top_bs or it is invalid' });
  assert.equal(newer.state.stage, 'none');
  assert.equal(older.state.stage, 'none');
  // nothing left behind: no filter above the disk, no extra references, no blocker
  assert.equal(newer.hidden.backing, newer.localNode);
  assert.equal(newer.repl.children.has('hidden disk'), false);
  assert.equal(older.repl.children.has('hidden disk'), false);
  newer.repl.checkNotBlocked();
  assert.equal(jobManagerOf(graph).queryJobs().length, 0);
  // a copy made before the failure would be gone: writes now land directly
  await newer.local.write(0, filled(512, 0x22));
  assert.deepEqual(await allocation(newer.hidden), []);
  // fix the older node by replacing it; the retry starts for real
  graph.releaseBackend(older.top);
  await graph.settle();
  const fixed = await secondary(t, { fill: 0x11, name: 'c', graph, dir });
  await reg.startAll('secondary');
  assert.equal(newer.state.stage, 'running');
  assert.equal(fixed.state.stage, 'running');
  await newer.local.write(0, filled(512, 0x23));
  await expectBytes(newer.top, 0, 512, 0x22);
  await reg.stopAll(true);
  for (const s of reg.list()) await s.waitFailover();
  await reg.getErrorAll();
});

test('decision 7: stop_all and get_error_all visit every node', async (t) => {
  const dir = tempDir(t);
  const graph = new BlockGraph(createRegistry([faultDriver]));
  const a = await secondary(t, { fill: 0x11, name: 'a', graph, dir });
  const b = await secondary(t, { fill: 0x11, name: 'b', graph, dir });
  const reg = replicationRegistry(graph);
  await reg.startAll('secondary');
  await b.state.stop(false); // newest done: a second stop is ignored, the older still runs
  await reg.stopAll(false);
  assert.equal(a.state.stage, 'done');
  assert.equal(b.state.stage, 'done');
  await reg.getErrorAll();
  assert.deepEqual(reg.query().map((q) => [q['node-name'], q.mode, q.stage]), [
    ['b-repl', 'secondary', 'done'],
    ['a-repl', 'secondary', 'done'],
  ]);
});

// ---- start preconditions and decisions 8, 12 ------------------------------------

test('a secondary whose graph the replication layer never wired refuses to start, leaving nothing behind', async (t) => {
  const s = await secondary(t, { fill: 0x11 });
  // as a graph no registry or job manager was asked for: the filter has no jobs to run
  delete s.graph.services.replicationJobs;
  await assert.rejects(s.state.start('secondary'), { message: 'replication jobs are not wired for this graph (replication/jobs.ts)' });
  assert.equal(s.state.stage, 'none');
  assert.equal(s.repl.children.has('hidden disk'), false);
  assert.equal(s.hidden.readOnly, true);
  s.repl.checkNotBlocked();
  wireReplicationJobs(s.graph);
  await s.state.start('secondary');
  assert.equal(s.state.stage, 'running');
  await s.state.stop(false);
});

test('secondary start preconditions give QEMU messages and leave nothing behind', async (t) => {
  const dir = tempDir(t);
  const graph = new BlockGraph(createRegistry([faultDriver]));
  // the nodes are driven directly, not through the registry: hand them their jobs
  wireReplicationJobs(graph);
  t.after(() => graph.closeAll());
  const img = async (name: string, size = SIZE) => {
    await createQcow2(join(dir, name), { size });
    return { driver: 'file', filename: join(dir, name) };
  };
  const disk = await graph.open({ driver: 'qcow2', 'node-name': 'disk', file: await img('disk.qcow2') });
  const open = async (name: string, file: Record<string, unknown>, topId = name) => {
    const n = await graph.open({ driver: 'replication', 'node-name': name, mode: 'secondary', 'top-id': topId, file });
    graph.createBackend(n, { name: `${name}-dev` });
    return replicationStateOf(n)!;
  };
  const qcow = async (f: string, backing?: unknown, size = SIZE) => ({
    driver: 'qcow2',
    file: await img(f, size),
    ...(backing !== undefined ? { backing } : {}),
  });
  // decision 12: only a user attachment (an export, a device) is a block backend
  const s1 = await open('r1', await qcow('a1.qcow2', await qcow('h1.qcow2', 'disk')));
  const internal = graph.createBackend(disk); // an internal user does not count
  await assert.rejects(s1.start('secondary'), { message: "The secondary disk doesn't have block backend" });
  graph.releaseBackend(internal);
  graph.createBackend(disk, { name: 'disk-export' });
  // top-id naming nothing; decision 8: no references left behind, read-only restored
  const s1b = await open('r1b', await qcow('a1b.qcow2', await qcow('h1b.qcow2', 'disk')), 'nowhere');
  const hidden1b = graph.lookup('r1b')!.file!.backing!;
  assert.equal(hidden1b.readOnly, true);
  await assert.rejects(s1b.start('secondary'), { message: 'No top_bs or it is invalid' });
  assert.deepEqual(hidden1b.parentNodes().map((n) => n.driver.name), ['qcow2']);
  assert.equal(hidden1b.readOnly, true);
  assert.equal(s1b.stage, 'none');
  // top-id naming a node that is not a root / does not contain the replication node
  const s2 = await open('r2', await qcow('a2.qcow2', await qcow('h2.qcow2', 'disk')), 'disk-export');
  await assert.rejects(s2.start('secondary'), { message: 'No top_bs or it is invalid' });
  const s2b = await open('r2b', await qcow('a2b.qcow2', await qcow('h2b.qcow2', 'disk')), 'r1-dev');
  await assert.rejects(s2b.start('secondary'), { message: 'No top_bs or it is invalid' });
  // chain shape
  const s3 = await open('r3', await qcow('a3.qcow2', null));
  await assert.rejects(s3.start('secondary'), { message: "Active disk doesn't have backing file" });
  const s4 = await open('r4', await qcow('a4.qcow2', await qcow('h4.qcow2', null)));
  await assert.rejects(s4.start('secondary'), { message: "Hidden disk doesn't have backing file" });
  const s5 = await open('r5', await qcow('a5.qcow2', await qcow('h5.qcow2', 'disk', SIZE / 2), SIZE / 2));
  await assert.rejects(s5.start('secondary'), { message: "Active disk, hidden disk, secondary disk's length are not the same" });
  for (const s of [s1, s1b, s2, s2b, s3, s4, s5]) assert.equal(s.stage, 'none');
  // the node that failed for a missing backend starts once the disk is exported
  await s1.start('secondary');
  assert.equal(s1.stage, 'running');
  await s1.stop(false);
});

test('replication open-time checks: mode and top-id', async () => {
  const graph = new BlockGraph(createRegistry());
  const file = { driver: 'memory', size: 1 * MiB };
  await assert.rejects(graph.open({ driver: 'replication', file }), { message: 'Missing the option mode' });
  await assert.rejects(graph.open({ driver: 'replication', mode: 'primary', 'top-id': 'x', file }), {
    message: 'The primary side does not support option top-id',
  });
  await assert.rejects(graph.open({ driver: 'replication', mode: 'secondary', file }), { message: 'Missing the option top-id' });
  await assert.rejects(graph.open({ driver: 'replication', mode: 'x', file }), { message: "Parameter 'mode' does not accept value 'x'" });
  await assert.rejects(graph.open({ driver: 'replication', mode: 'primary' }), { message: "Parameter 'file' is missing" });
  await graph.settle();
  assert.equal(graph.nodes.size, 0);
});

// ---- decision 4: quorum never counts the replication filter's vote ------------------------

test('decision 4: a local disk write error on the primary fails the guest write', async (t) => {
  const dir = tempDir(t);
  await createQcow2(join(dir, 'local.qcow2'), { size: SIZE });
  await createQcow2(join(dir, 'forward.qcow2'), { size: SIZE });
  const graph = new BlockGraph(createRegistry([faultDriver]));
  t.after(() => graph.closeAll());
  const local = await graph.open({
    driver: 'test-fault',
    'node-name': 'local-fault',
    file: { driver: 'qcow2', file: { driver: 'file', filename: join(dir, 'local.qcow2') } },
  });
  const quorum = await graph.open({ driver: 'quorum', 'node-name': 'colo-disk0', 'read-pattern': 'fifo', 'vote-threshold': 1, children: ['local-fault'] });
  const guest = graph.createBackend(quorum, { name: 'guest' });
  const repl = await graph.open({
    driver: 'replication',
    mode: 'primary',
    'node-name': 'replication0',
    file: { driver: 'test-fault', 'node-name': 'fwd-fault', file: { driver: 'qcow2', file: { driver: 'file', filename: join(dir, 'forward.qcow2') } } },
  });
  // hot-add the replication node as children.1 (what x-blockdev-change does)
  const q = quorum.impl as unknown as { addChild(n: BlockNode): string };
  assert.equal(q.addChild(repl), 'children.1');
  const events: Array<[string, Record<string, unknown>]> = [];
  graph.on('event', (name: string, data: Record<string, unknown>) => events.push([name, data]));
  await replicationRegistry(graph).startAll('primary');
  await guest.write(0, filled(4096, 0x5a));
  await expectBytes(graph.getNode('fwd-fault'), 0, 4096, 0x5a);
  // the local disk fails: the guest sees the error (QEMU would report success)
  faultControl(local).failWrites = 'EIO';
  await assert.rejects(guest.write(0, filled(4096, 0x5b)), { code: 'EIO' });
  assert.ok(events.some(([n, d]) => n === 'QUORUM_REPORT_BAD' && d['node-name'] === 'local-fault' && d.type === 'write'));
  faultControl(local).failWrites = null;
  await expectBytes(guest, 0, 4096, 0x5a);
  // the forward fails: the guest write succeeds, get_error reports it
  faultControl(graph.getNode('fwd-fault')).failWrites = 'EIO';
  await guest.write(0, filled(4096, 0x5c));
  await expectBytes(guest, 0, 4096, 0x5c);
  await assert.rejects(replicationRegistry(graph).getErrorAll(), { message: 'I/O error occurred' });
});

// ---- decision 5: checkpoints are quiescent by construction -------------------------------

test('decision 5: a checkpoint amid concurrent primary and secondary writes stays exact', async (t) => {
  const s = await secondary(t, { fill: 0x11 });
  await s.reg.startAll('secondary');
  const writes: Promise<void>[] = [];
  // 64 primary writes, each to its own cluster, racing a checkpoint
  for (let i = 0; i < 64; i++) writes.push(s.local.write(i * 64 * KiB + 100, filled(1000, 0x22)));
  const cp = s.reg.doCheckpointAll();
  for (let i = 0; i < 64; i++) writes.push(s.local.write(i * 64 * KiB + 2000, filled(1000, 0x33)));
  await Promise.all([...writes, cp]);
  // Every cluster: if its 0x33 write was copied after the checkpoint, hidden holds the
  // post-checkpoint content (0x11 with 0x22 applied, since that write preceded it);
  // the secondary's view must equal the secondary disk at the checkpoint for every byte.
  const view = await s.top.read(0, 64 * 64 * KiB);
  const disk = await s.localNode.read(0, 64 * 64 * KiB);
  for (let i = 0; i < 64; i++) {
    const base = i * 64 * KiB;
    const v = view.subarray(base, base + 64 * KiB);
    const d = disk.subarray(base, base + 64 * KiB);
    // the disk has both writes; the view lacks at most the writes after the checkpoint
    assert.equal(d[100], 0x22);
    assert.equal(d[2000], 0x33);
    const expected = Buffer.alloc(64 * KiB, 0x11);
    if (v[100] === 0x22) expected.fill(0x22, 100, 1100);
    if (v[2000] === 0x33) expected.fill(0x33, 2000, 3000);
    assert.ok(v.equals(expected), `cluster ${i} is a consistent state`);
  }
  // after another checkpoint the view equals the disk exactly
  await s.reg.doCheckpointAll();
  assert.ok((await s.top.read(0, SIZE)).equals(await s.localNode.read(0, SIZE)));
});

// ---- decision 6: failover fences the secondary disk's exports -----------------------------

test('decision 6: from failover on, the secondary disk export refuses writes but serves reads', async (t) => {
  const s = await secondary(t, { fill: 0x11 });
  await s.reg.startAll('secondary');
  await s.local.write(0, filled(MiB, 0x22));
  await s.reg.stopAll(true);
  await assert.rejects(s.local.write(0, filled(512, 0x99)), { code: 'EIO' });
  await assert.rejects(s.local.writeZeroes(0, 512), { code: 'EIO' });
  await assert.rejects(s.local.discard(0, 65536), { code: 'EIO' });
  await s.state.waitFailover();
  await expectBytes(s.local, 0, MiB, 0x11);
  // an export created after the failover is not fenced
  const fresh = s.graph.createBackend(s.localNode, { name: 'after-failover' });
  await fresh.write(0, filled(512, 0x77));
  await expectBytes(s.top, 0, 512, 0x77);
});

// ---- decision 9: writes of any size replicate exactly -------------------------------------

test('decision 9: an unaligned primary write is forwarded exactly', async (t) => {
  const p = await primary(t);
  await p.reg.startAll('primary');
  const fwd = p.graph.getNode('p-fault');
  await fwd.write(0, filled(4096, 0xee));
  await p.top.write(1000, filled(1000, 0xab));
  const got = await fwd.read(0, 4096);
  const expected = filled(4096, 0xee).fill(0xab, 1000, 2000);
  assert.ok(got.equals(expected));
});

// ---- decision 10: discards reach every child as zero writes -----------------------------

test('decision 10: a discard on the primary quorum zeroes both the local disk and the forward target', async (t) => {
  const p = await primary(t);
  const localFile = join(p.dir, 'local.qcow2');
  await createQcow2(localFile, { size: SIZE });
  await p.graph.open({ driver: 'qcow2', 'node-name': 'local', file: { driver: 'file', filename: localFile } });
  const quorum = await p.graph.open({ driver: 'quorum', 'read-pattern': 'fifo', 'vote-threshold': 1, children: ['local', 'p-repl'] });
  const guest = p.graph.createBackend(quorum, { name: 'guest' });
  await replicationRegistry(p.graph).startAll('primary');
  await guest.write(0, filled(MiB, 0x61));
  await guest.discard(0, MiB);
  await expectBytes(p.graph.getNode('local'), 0, MiB, 0);
  await expectBytes(p.graph.getNode('p-fault'), 0, MiB, 0);
  await expectBytes(guest, 0, MiB, 0);
});

// ---- decision 11: replication's jobs stay internal ---------------------------------------

test('decision 11: the copy and commit jobs are not listed and the overlays leave the graph', async (t) => {
  const s = await secondary(t, { fill: 0x11 });
  const mgr = jobManagerOf(s.graph);
  const events: string[] = [];
  mgr.on('event', (name: string) => events.push(name));
  await s.reg.startAll('secondary');
  assert.deepEqual(mgr.queryJobs(), []);
  assert.deepEqual(mgr.queryBlockJobs(), []);
  await s.top.write(0, filled(MiB, 0x33));
  await s.reg.stopAll(true);
  assert.deepEqual(mgr.queryJobs(), []);
  await s.state.waitFailover();
  await s.graph.settle();
  assert.deepEqual(events, []);
  assert.equal(s.graph.nodes.has('s-active'), false);
  assert.equal(s.graph.nodes.has('s-hidden'), false);
});
