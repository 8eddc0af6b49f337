// The create job at graph level: host files (sizes, old data, preallocation, failures), qcow2
// on nodes (node references, inline definitions, memory nodes, refusals), the job's life as a
// plain job (JOB_STATUS_CHANGE only, concluded until dismissed, not a block job), and images
// that then serve I/O as qcow2 nodes.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { JobManager } from '../../src/jobs/job.js';
import { startCreate, type CreateOptions } from '../../src/jobs/create.js';
import { createQcow2 } from '../../src/block/drivers/qcow2/create.js';
import { newGraph, tempDir } from '../helpers/graph.js';
import { fill, recordEvents, statuses } from '../helpers/jobs.js';
import type { BlockGraph } from '../../src/block/graph.js';

const MiB = 1024 * 1024;

/** Runs a create job to its end; returns query-jobs' row for it, then dismisses it. */
async function create(g: BlockGraph, mgr: JobManager, id: string, options: CreateOptions): Promise<Record<string, unknown>> {
  const job = await startCreate(mgr, id, options);
  await job.done;
  const row = mgr.queryJobs().find((j) => j.id === id);
  assert.ok(row, `job ${id} stays listed once concluded`);
  job.dismiss();
  await g.settle();
  return row as unknown as Record<string, unknown>;
}

function ok(id: string): Record<string, unknown> {
  return { id, type: 'create', status: 'concluded', 'current-progress': 1, 'total-progress': 1 };
}

function failed(id: string, error: string): Record<string, unknown> {
  return { ...ok(id), error };
}

test('a create job is a plain job: status events only, concluded until dismissed, no block-job face', async (t) => {
  const dir = tempDir(t);
  const g = newGraph();
  const mgr = new JobManager(g);
  const events = recordEvents(mgr);
  const file = join(dir, 'a.raw');
  const job = await startCreate(mgr, 'c1', { driver: 'file', filename: file, size: 4096 });
  const r = await job.done;
  assert.equal(r.ret, 0);
  assert.deepEqual(statuses(events, 'c1'), ['created', 'running', 'waiting', 'pending', 'concluded']);
  assert.deepEqual(
    events.map((e) => e.name),
    Array(5).fill('JOB_STATUS_CHANGE'),
    'no BLOCK_JOB_COMPLETED for a create job',
  );
  assert.deepEqual(mgr.queryJobs(), [ok('c1')]);
  assert.deepEqual(mgr.queryBlockJobs(), []);
  assert.throws(() => mgr.findBlockJob('c1'), { message: "Block job 'c1' not found" });
  await assert.rejects(startCreate(mgr, 'c1', { driver: 'file', filename: file, size: 0 }), { message: "Job ID 'c1' already in use" });
  await assert.rejects(startCreate(mgr, '1c', { driver: 'file', filename: file, size: 0 }), { message: "Invalid job ID '1c'" });
  assert.throws(() => job.userCancel(), { message: "Job 'c1' in state 'concluded' cannot accept command verb 'cancel'" });
  mgr.find('c1').dismiss();
  assert.deepEqual(statuses(events, 'c1').slice(-1), ['null']);
  assert.deepEqual(mgr.queryJobs(), []);
  assert.equal(statSync(file).size, 4096);
});

test('startCreate resolves after a failure found before any I/O, and before the I/O otherwise', async (t) => {
  const dir = tempDir(t);
  const g = newGraph();
  const mgr = new JobManager(g);
  // the directory does not exist: QEMU fails in the open, before it yields
  const early = await startCreate(mgr, 'e', { driver: 'file', filename: join(dir, 'no', 'x.raw'), size: 0 });
  assert.equal(early.status, 'concluded');
  assert.deepEqual(mgr.queryJobs(), [failed('e', `Could not create '${join(dir, 'no', 'x.raw')}': No such file or directory`)]);
  early.dismiss();
  // a resize failure comes after QEMU's first yield: the job is still running when it resolves
  const late = await startCreate(mgr, 'l', { driver: 'file', filename: join(dir, 'l.raw'), size: -1 });
  assert.equal(late.status, 'running');
  await late.done;
  assert.deepEqual(mgr.queryJobs(), [failed('l', 'Could not resize file: Invalid argument')]);
  late.dismiss();
  // qcow2 on a missing node: before; on an inline definition whose file is missing: after
  const missing = await startCreate(mgr, 'm', { driver: 'qcow2', file: 'nothere', size: MiB });
  assert.equal(missing.status, 'concluded');
  assert.deepEqual(mgr.queryJobs(), [failed('m', "Cannot find device='nothere' nor node-name='nothere'")]);
  missing.dismiss();
  const inline = await startCreate(mgr, 'i', { driver: 'qcow2', file: { driver: 'file', filename: join(dir, 'none.qcow2') }, size: MiB });
  assert.equal(inline.status, 'running');
  await inline.done;
  assert.deepEqual(mgr.queryJobs(), [failed('i', `Could not open '${join(dir, 'none.qcow2')}': No such file or directory`)]);
  inline.dismiss();
});

test('file: creates, empties an existing file, preallocates, and reports QEMU errors', async (t) => {
  const dir = tempDir(t);
  const g = newGraph();
  const mgr = new JobManager(g);
  const old = join(dir, 'old.raw');
  writeFileSync(old, fill(7, 3 * MiB));
  assert.deepEqual(await create(g, mgr, 'a', { driver: 'file', filename: old, size: MiB + 512 }), ok('a'));
  assert.ok(readFileSync(old).equals(Buffer.alloc(MiB + 512)), 'old data is gone, the size is the new one');

  const full = join(dir, 'full.raw');
  assert.deepEqual(await create(g, mgr, 'b', { driver: 'file', filename: full, size: 200_000, preallocation: 'full' }), ok('b'));
  assert.ok(readFileSync(full).equals(Buffer.alloc(200_000)));
  assert.ok(statSync(full).blocks * 512 >= 200_000, 'full preallocation allocates the blocks');

  const falloc = join(dir, 'falloc.raw');
  assert.deepEqual(await create(g, mgr, 'c', { driver: 'file', filename: falloc, size: 2 * MiB, preallocation: 'falloc', nocow: true }), ok('c'));
  assert.ok(readFileSync(falloc).equals(Buffer.alloc(2 * MiB)));

  assert.deepEqual(
    await create(g, mgr, 'd', { driver: 'file', filename: join(dir, 'm.raw'), size: 4096, preallocation: 'metadata' }),
    failed('d', 'Unsupported preallocation mode: metadata'),
  );
  assert.deepEqual(await create(g, mgr, 'e', { driver: 'file', filename: dir, size: 0 }), failed('e', `Could not create '${dir}': Is a directory`));
  assert.deepEqual(
    await create(g, mgr, 'f', { driver: 'file', filename: join(dir, 'h.raw'), size: 0, extentSizeHint: 2 ** 32 }),
    failed('f', 'Extent size hint is too large'),
  );
  assert.equal(existsSync(join(dir, 'h.raw')), false, 'a rejected hint creates nothing');

  // writing zeroes stops at a cancel (shutdown cancels every job)
  const big = await startCreate(mgr, 'g', { driver: 'file', filename: join(dir, 'big.raw'), size: 1024 * MiB, preallocation: 'full' });
  big.userCancel();
  const r = await big.done;
  assert.equal(r.ret === 0 ? 'ok' : r.ret.code, 'ECANCELED');
  assert.deepEqual(mgr.queryJobs(), [failed('g', 'Operation canceled')]);
  assert.ok(statSync(join(dir, 'big.raw')).blocks * 512 < 1024 * MiB, 'not every zero was written');
  big.dismiss();
});

test('qcow2 on a file node is byte-identical to the host-file creation, and the node serves I/O', async (t) => {
  const dir = tempDir(t);
  const g = newGraph();
  const mgr = new JobManager(g);
  const cases: Array<Omit<Extract<CreateOptions, { driver: 'qcow2' }>, 'driver' | 'file'>> = [
    { size: 64 * MiB },
    { size: 0 },
    { size: 3 * 1024 * MiB, clusterSize: 4096, refcountBits: 64 },
    { size: 10 * MiB, version: 'v2', backingFile: 'base.qcow2', backingFmt: 'qcow2' },
    { size: 8 * MiB + 512, preallocation: 'metadata', clusterSize: 16384, lazyRefcounts: true },
  ];
  for (const [i, c] of cases.entries()) {
    const mine = join(dir, `mine${i}.qcow2`);
    const ref = join(dir, `ref${i}.qcow2`);
    writeFileSync(mine, '');
    await g.open({ driver: 'file', 'node-name': 'f', filename: mine }, { monitorOwned: true });
    assert.deepEqual(await create(g, mgr, `q${i}`, { driver: 'qcow2', file: 'f', ...c }), ok(`q${i}`));
    await g.deleteNode('f');
    await createQcow2(ref, {
      size: c.size,
      ...(c.clusterSize !== undefined ? { clusterSize: c.clusterSize } : {}),
      ...(c.refcountBits !== undefined ? { refcountBits: c.refcountBits } : {}),
      ...(c.version === 'v2' ? { compat: '0.10' as const } : {}),
      ...(c.backingFile !== undefined ? { backingFile: c.backingFile } : {}),
      ...(c.backingFmt !== undefined ? { backingFormat: c.backingFmt } : {}),
      ...(c.preallocation === 'metadata' ? { preallocation: 'metadata' as const } : {}),
      ...(c.lazyRefcounts !== undefined ? { lazyRefcounts: c.lazyRefcounts } : {}),
    });
    assert.ok(readFileSync(mine).equals(readFileSync(ref)), `case ${i} (${JSON.stringify(c)}) is byte-identical`);
  }

  // the supervisor's way: keep the file node and put the qcow2 node on it
  const disk = join(dir, 'disk.qcow2');
  assert.deepEqual(await create(g, mgr, 'c1', { driver: 'file', filename: disk, size: 0 }), ok('c1'));
  const f1 = await g.open({ driver: 'file', 'node-name': 'f1', filename: disk }, { monitorOwned: true });
  assert.deepEqual(await create(g, mgr, 'c2', { driver: 'qcow2', file: 'f1', size: 16 * MiB }), ok('c2'));
  const q = await g.open({ driver: 'qcow2', 'node-name': 'q', file: 'f1' }, { monitorOwned: true });
  assert.equal(q.getLength(), 16 * MiB);
  await q.write(5 * MiB, fill(3, 256 * 1024));
  assert.ok((await q.read(5 * MiB, 256 * 1024)).equals(fill(3, 256 * 1024)));
  assert.ok((await q.read(0, MiB)).equals(Buffer.alloc(MiB)));
  // a format on the node refuses to share write and resize, as in QEMU
  assert.deepEqual(
    await create(g, mgr, 'c3', { driver: 'qcow2', file: 'f1', size: MiB }),
    failed(
      'c3',
      "Permission conflict on node 'f1': permissions 'write, resize' are both required by an unnamed block device (uses node 'f1' as 'root' child) and unshared by node 'q' (uses node 'f1' as 'file' child).",
    ),
  );
  assert.ok((await q.read(5 * MiB, 256 * 1024)).equals(fill(3, 256 * 1024)), 'the refused job left the image alone');
  // the image in use is locked: creating a file over it is refused before it is emptied
  const size = statSync(disk).size;
  assert.deepEqual(await create(g, mgr, 'c4', { driver: 'file', filename: disk, size: 0 }), failed('c4', 'Failed to get "write" lock'));
  assert.equal(statSync(disk).size, size);
  assert.ok((await q.read(5 * MiB, 256 * 1024)).equals(fill(3, 256 * 1024)));
  await g.deleteNode('q');
  await assert.rejects(g.deleteNode('f1').then(() => f1.read(0, 1)));
});

test('qcow2 on an inline definition closes its node; on a memory node it needs no file at all', async (t) => {
  const dir = tempDir(t);
  const g = newGraph();
  const mgr = new JobManager(g);
  const img = join(dir, 'inline.qcow2');
  writeFileSync(img, '');
  assert.deepEqual(await create(g, mgr, 'i', { driver: 'qcow2', file: { driver: 'file', filename: img }, size: 2 * MiB }), ok('i'));
  assert.deepEqual([...g.nodes.keys()], [], 'the inline node is gone once the job concluded');
  const ref = join(dir, 'ref.qcow2');
  await createQcow2(ref, { size: 2 * MiB });
  assert.ok(readFileSync(img).equals(readFileSync(ref)));

  const mem = await g.open({ driver: 'memory', 'node-name': 'mem', size: 4 * MiB }, { monitorOwned: true });
  assert.deepEqual(await create(g, mgr, 'm', { driver: 'qcow2', file: 'mem', size: 32 * MiB, clusterSize: 4096 }), ok('m'));
  const q = await g.open({ driver: 'qcow2', 'node-name': 'q', file: 'mem' }, { monitorOwned: true });
  await q.write(31 * MiB, fill(9, 8192));
  assert.ok((await q.read(31 * MiB, 8192)).equals(fill(9, 8192)));
  assert.equal((await mem.read(0, 4)).toString('latin1'), 'QFI\xfb');
  await g.deleteNode('q');

  const ro = await g.open({ driver: 'memory', 'node-name': 'ro', size: MiB, 'read-only': true }, { monitorOwned: true });
  assert.deepEqual(await create(g, mgr, 'r', { driver: 'qcow2', file: 'ro', size: MiB }), failed('r', 'Block node is read-only'));
  assert.ok((await ro.read(0, 4)).equals(Buffer.alloc(4)));
});

test('qcow2 options: QEMU checks and messages first, then what lockstep refuses', async () => {
  const g = newGraph();
  const mgr = new JobManager(g);
  await g.open({ driver: 'memory', 'node-name': 'm', size: 4 * MiB }, { monitorOwned: true });
  const q = (id: string, o: Partial<Extract<CreateOptions, { driver: 'qcow2' }>>) => create(g, mgr, id, { driver: 'qcow2', file: 'm', size: MiB, ...o });
  const rows: Array<[Partial<Extract<CreateOptions, { driver: 'qcow2' }>>, string]> = [
    [{ size: 1000 }, 'Image size must be a multiple of 512 bytes'],
    [{ size: 1000, extendedL2: true }, 'Image size must be a multiple of 512 bytes'],
    [{ extendedL2: true, version: 'v2' }, 'Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)'],
    [{ extendedL2: true, clusterSize: 4096 }, 'Extended L2 entries are only supported with cluster sizes of at least 16384 bytes'],
    [{ extendedL2: true }, 'Extended L2 entries are not supported by lockstep'],
    [{ clusterSize: 256 }, 'Cluster size must be a power of two between 512 and 2048k'],
    [{ clusterSize: 4 * MiB }, 'Cluster size must be a power of two between 512 and 2048k'],
    [{ backingFile: 'b', preallocation: 'metadata' }, 'Backing file and preallocation can only be used at the same time if extended_l2 is on'],
    [{ backingFmt: 'raw' }, 'Backing format cannot be used without backing file'],
    [{ version: 'v2', lazyRefcounts: true }, 'Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)'],
    [{ refcountBits: 0 }, 'Refcount width must be a power of two and may not exceed 64 bits'],
    [{ refcountBits: 128 }, 'Refcount width must be a power of two and may not exceed 64 bits'],
    [{ version: 'v2', refcountBits: 8 }, 'Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)'],
    [{ dataFileRaw: true }, 'data-file-raw requires data-file'],
    [{ dataFile: 'x' }, 'External data files are not supported by lockstep'],
    [{ compressionType: 'zstd', version: 'v2' }, 'Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)'],
    [{ compressionType: 'zstd' }, "Compression type 'zstd' is not supported by lockstep"],
    [{ encrypt: { format: 'luks' } }, 'Encrypted qcow2 images are not supported by lockstep'],
    [{ preallocation: 'falloc' }, "Preallocation mode 'falloc' of qcow2 images is not supported by lockstep (use off or metadata)"],
    [{ size: -512 }, 'Could not resize image: Image size cannot be negative'],
    [{ size: 2 ** 52 }, 'Could not resize image: Failed to grow the L1 table: File too large'],
    [{ size: 2 ** 40, clusterSize: 512 }, 'Could not resize image: Failed to grow the L1 table: File too large'],
    [{ size: 2 ** 62 }, 'Could not resize image: Failed to grow the L1 table: File too large'],
    [{ backingFile: 'x'.repeat(1024) }, `Could not assign backing file '${'x'.repeat(1024)}' with format '(null)': Invalid argument`],
  ];
  for (const [i, [o, error]] of rows.entries()) assert.deepEqual(await q(`j${i}`, o), failed(`j${i}`, error), JSON.stringify(o));
  // I/O failures name the step, in QEMU's words (blkdebug injects them)
  const io: Array<[Record<string, unknown>, string]> = [
    [{ event: 'none', errno: 28 }, 'Could not write qcow2 header: No space left on device'],
    [{ event: 'none', errno: 5, sector: 128 }, 'Could not write refcount table: Input/output error'],
    [{ event: 'none', errno: 5, sector: 384 }, 'Could not resize image: Failed to grow the L1 table: Input/output error'],
  ];
  for (const [i, [rule, error]] of io.entries()) {
    await g.open({ driver: 'blkdebug', 'node-name': 'd', image: { driver: 'memory', size: 0 }, 'inject-error': [rule] }, { monitorOwned: true });
    assert.deepEqual(await create(g, mgr, `io${i}`, { driver: 'qcow2', file: 'd', size: MiB }), failed(`io${i}`, error), JSON.stringify(rule));
    await g.deleteNode('d');
  }
  // zlib is the default and accepted as such
  assert.deepEqual(await q('z', { compressionType: 'zlib' }), ok('z'));
});
