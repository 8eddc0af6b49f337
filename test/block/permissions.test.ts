// The permission model on graph edges (src/block/permissions.ts) as the graph applies it:
// every conflict QEMU 7.2 refuses is refused here with QEMU's words, and every combination
// replication, quorum, copy-before-write, jobs and exports need is accepted.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { newGraph, tempDir } from '../helpers/graph.js';
import { createQcow2 } from '../../src/block/drivers/qcow2/create.js';
import {
  MIRROR_TARGET_PERMS,
  RESIZE_PERMS,
  PERM,
  PERM_ALL,
  cowChildPerms,
  exportPerms,
  findParentConflict,
  permNames,
  storageChildPerms,
  toolPerms,
} from '../../src/block/permissions.js';
import type { BlockNode } from '../../src/block/node.js';
import { startMirror } from '../../src/jobs/mirror.js';
import { startBackup } from '../../src/jobs/backup.js';
import { JobManager } from '../../src/jobs/job.js';

const MiB = 1024 * 1024;
/** a reader that lets nobody write beside it */
const NO_WRITERS = { perm: PERM.CONSISTENT_READ, shared: PERM.CONSISTENT_READ | PERM.WRITE_UNCHANGED };

function conflict(node: string, perms: string, b: string, bRole: string, a: string, aRole: string): string {
  return (
    `Permission conflict on node '${node}': permissions '${perms}' are both required by ${b} ` +
    `(uses node '${node}' as '${bRole}' child) and unshared by ${a} (uses node '${node}' as '${aRole}' child).`
  );
}

function edgeOf(parent: BlockNode, role: string): { perm: number; shared: number } {
  const e = parent.children.get(role);
  assert.ok(e, `${parent.name} has a '${role}' child`);
  return { perm: e.perm, shared: e.shared };
}

test('the model: QEMU names, the pair order of the check, a format on its file and its backing', () => {
  assert.equal(permNames(PERM.WRITE | PERM.RESIZE), 'write, resize');
  assert.equal(permNames(PERM_ALL), 'consistent read, write, write unchanged, resize');
  // the first parent listed that does not share what another takes is named as unsharing
  const writer = { ...exportPerms(true), role: 'root', desc: 'an unnamed block device' };
  const target = { ...MIRROR_TARGET_PERMS, role: 'root', desc: "block device 'm'" };
  assert.equal(
    findParentConflict('n', [target, writer])?.message,
    conflict('n', 'consistent read, write', 'an unnamed block device', 'root', "block device 'm'", 'root'),
  );
  assert.equal(findParentConflict('n', [writer, { ...exportPerms(true), role: 'root', desc: 'x' }]), null);
  // a writable format with no users still writes metadata and never shares write or resize
  assert.deepEqual(storageChildPerms({ perm: 0, shared: PERM_ALL }, true), {
    perm: PERM.CONSISTENT_READ | PERM.WRITE | PERM.RESIZE,
    shared: PERM.CONSISTENT_READ | PERM.WRITE_UNCHANGED,
  });
  assert.deepEqual(storageChildPerms({ perm: 0, shared: PERM_ALL }, false), {
    perm: PERM.CONSISTENT_READ,
    shared: PERM.CONSISTENT_READ | PERM.WRITE_UNCHANGED,
  });
  // a backing file: read only; writable by others only if the overlay's users accept it
  assert.deepEqual(cowChildPerms(exportPerms(true)), { perm: PERM.CONSISTENT_READ, shared: PERM_ALL });
  assert.deepEqual(cowChildPerms(NO_WRITERS), { perm: PERM.CONSISTENT_READ, shared: PERM.CONSISTENT_READ | PERM.WRITE_UNCHANGED });
  // tools share everything (QEMU's blk_new_open): a raw image takes two of them
  assert.deepEqual(toolPerms(true), { perm: PERM.CONSISTENT_READ | PERM.WRITE, shared: PERM_ALL });
  assert.deepEqual(toolPerms(false, true), { perm: 0, shared: PERM_ALL });
});

test('a second writable qcow2 on a file node in use is refused, a reader beside a writer too, two readers are fine', async (t) => {
  const dir = tempDir(t);
  const img = join(dir, 'a.qcow2');
  await createQcow2(img, { size: MiB });
  const g = newGraph();
  t.after(() => g.closeAll());
  await g.open({ driver: 'file', 'node-name': 'f', filename: img }, { monitorOwned: true });
  await g.open({ driver: 'qcow2', 'node-name': 'q1', file: 'f' }, { monitorOwned: true });
  await assert.rejects(g.open({ driver: 'qcow2', 'node-name': 'q2', file: 'f' }), {
    message: conflict('f', 'write, resize', "node 'q1'", 'file', "node 'q2'", 'file'),
  });
  assert.equal(g.lookup('q2'), null, 'the refused node is gone');
  await assert.rejects(g.open({ driver: 'qcow2', 'node-name': 'r1', 'read-only': true, file: 'f' }), {
    message: conflict('f', 'write, resize', "node 'q1'", 'file', "node 'r1'", 'file'),
  });
  await g.deleteNode('q1');
  await g.open({ driver: 'qcow2', 'node-name': 'r1', 'read-only': true, file: 'f' }, { monitorOwned: true });
  await g.open({ driver: 'qcow2', 'node-name': 'r2', 'read-only': true, file: 'f' }, { monitorOwned: true });
  assert.deepEqual(edgeOf(g.getNode('r2'), 'file'), { perm: PERM.CONSISTENT_READ, shared: PERM.CONSISTENT_READ | PERM.WRITE_UNCHANGED });
});

test('exports: two writable exports of one node are fine; a reader that shares no write is refused beside one', async (t) => {
  const g = newGraph();
  t.after(() => g.closeAll());
  const n = await g.open({ driver: 'memory', 'node-name': 'disk', size: MiB }, { monitorOwned: true });
  const e1 = g.createBackend(n, { name: 'e1' });
  const e2 = g.createBackend(n, { name: 'e2' });
  assert.throws(() => g.createBackend(n, { perms: NO_WRITERS }), {
    message: conflict('disk', 'write', "block device 'e2'", 'root', 'an unnamed block device', 'root'),
  });
  g.releaseBackend(e2);
  g.releaseBackend(e1);
  const reader = g.createBackend(n, { perms: NO_WRITERS });
  assert.throws(() => g.createBackend(n, { name: 'e3' }), {
    message: conflict('disk', 'write', "block device 'e3'", 'root', 'an unnamed block device', 'root'),
  });
  assert.equal(g.backends.has('e3'), false, 'the refused export is not registered');
  g.releaseBackend(reader);
  g.releaseBackend(g.createBackend(n, { name: 'e3' }));
});

test('mirror onto a node exported writable is refused before anything is copied; a job target cannot be exported', async (t) => {
  const g = newGraph();
  t.after(() => g.closeAll());
  const mgr = new JobManager(g);
  const src = await g.open({ driver: 'memory', 'node-name': 'src', size: MiB }, { monitorOwned: true });
  const tgt = await g.open({ driver: 'memory', 'node-name': 'tgt', size: MiB }, { monitorOwned: true });
  await tgt.write(0, Buffer.alloc(4096, 0x5a));
  const exp = g.createBackend(tgt, { name: 'exp' });
  await assert.rejects(startMirror(mgr, { jobId: 'j0', source: src, target: tgt, sync: 'full' }), {
    message: conflict('tgt', 'consistent read, write', "block device 'exp'", 'root', 'an unnamed block device', 'root'),
  });
  assert.ok((await tgt.read(0, 4096)).equals(Buffer.alloc(4096, 0x5a)), "the export's data is untouched");
  assert.deepEqual(
    src.parentNodes().map((p) => p.name),
    [],
    'no filter left above the source',
  );
  assert.equal(mgr.get('j0'), undefined, 'no job left');
  g.releaseBackend(exp);

  const job = await startMirror(mgr, { jobId: 'j1', source: src, target: tgt, sync: 'full' });
  assert.throws(() => g.createBackend(tgt, { name: 'exp2', readOnly: true }), {
    message: conflict('tgt', 'consistent read', "block device 'exp2'", 'root', 'an unnamed block device', 'root'),
  });
  await job.cancel(true);
  await job.done;
  g.releaseBackend(g.createBackend(tgt, { name: 'exp2' }));
});

test('backup: copy-before-write lets the guest write its source and others write the target; nobody resizes the source', async (t) => {
  const g = newGraph();
  t.after(() => g.closeAll());
  const mgr = new JobManager(g);
  const src = await g.open({ driver: 'memory', 'node-name': 'src', size: MiB }, { monitorOwned: true });
  const tgt = await g.open({ driver: 'memory', 'node-name': 'tgt', size: MiB }, { monitorOwned: true });
  const guest = g.createBackend(src, { name: 'guest' });
  const job = await startBackup(mgr, { jobId: 'b0', source: src, target: tgt, sync: 'none' });
  const cbw = guest.node;
  assert.equal(cbw.driver.name, 'copy-before-write');
  await guest.write(0, Buffer.alloc(512, 1));
  // the target stays writable and readable by others (fleecing exports it)
  g.releaseBackend(g.createBackend(tgt, { name: 'fleece' }));
  // a resize of the source would break the copy (lockstep, unlike QEMU, lets another writer
  // in beside the filter: replication commits into the secondary disk under its filter)
  assert.throws(() => g.createBackend(src, { perms: RESIZE_PERMS }), {
    message: conflict('src', 'resize', 'an unnamed block device', 'root', `node '${cbw.name}'`, 'file'),
  });
  await job.cancel(true);
  await job.done;
});

test('replication graphs: the primary (quorum, replication, NBD-like child) and the secondary (export, cbw, hidden, active) are accepted', async (t) => {
  const dir = tempDir(t);
  for (const f of ['local.qcow2', 'sec.qcow2', 'hidden.qcow2', 'active.qcow2']) await createQcow2(join(dir, f), { size: MiB });
  const g = newGraph();
  t.after(() => g.closeAll());
  const primary = await g.open({
    driver: 'quorum',
    'node-name': 'colo-disk0',
    'vote-threshold': 1,
    'read-pattern': 'fifo',
    children: [
      { driver: 'qcow2', file: { driver: 'file', filename: join(dir, 'local.qcow2') } },
      { driver: 'replication', mode: 'primary', file: { driver: 'memory', 'node-name': 'nbd-stand-in', size: MiB } },
    ],
  });
  // the guest's export above it (replication itself is not started here: no I/O through it)
  g.createBackend(primary, { name: 'guest' });
  // quorum never lets another user resize one child alone (the children would differ)
  const local = primary.children.get('children.0')!.child;
  assert.throws(() => g.createBackend(local, { perms: RESIZE_PERMS }), {
    message: conflict(local.name, 'resize', 'an unnamed block device', 'root', "node 'colo-disk0'", 'children.0'),
  });

  const sec = await g.open({ driver: 'qcow2', 'node-name': 'sec', file: { driver: 'file', filename: join(dir, 'sec.qcow2') } }, { monitorOwned: true });
  const exp = g.createBackend(sec, { name: 'nbd-export' });
  await g.open({ driver: 'qcow2', 'node-name': 'hidden', file: { driver: 'file', filename: join(dir, 'hidden.qcow2') }, backing: 'sec' }, { monitorOwned: true });
  await g.open({ driver: 'qcow2', 'node-name': 'active', file: { driver: 'file', filename: join(dir, 'active.qcow2') }, backing: 'hidden' }, { monitorOwned: true });
  const repl = await g.open({ driver: 'replication', mode: 'secondary', 'top-id': 'top', 'node-name': 'repl', file: 'active' }, { monitorOwned: true });
  g.createBackend(repl, { name: 'top' });
  const job = await startBackup(new JobManager(g), { jobId: 'cbw', source: sec, target: g.getNode('hidden'), sync: 'none', internal: true });
  // the primary's forwarded write through the export: the old data is copied to hidden first
  await exp.write(0, Buffer.alloc(4096, 9));
  assert.ok((await exp.read(0, 4096)).equals(Buffer.alloc(4096, 9)));
  assert.ok((await g.getNode('hidden').read(0, 4096)).equals(Buffer.alloc(4096, 0)), 'hidden holds the old data');
  await job.cancel(true);
  await job.done;
});

test('a reopen read-only drops the write lock a format took on its file; read-write takes it back', async (t) => {
  const dir = tempDir(t);
  const img = join(dir, 'a.qcow2');
  await createQcow2(img, { size: MiB });
  const g = newGraph();
  t.after(() => g.closeAll());
  const q = await g.open({ driver: 'qcow2', 'node-name': 'q', file: { driver: 'file', 'node-name': 'f', filename: img } }, { monitorOwned: true });
  assert.equal(edgeOf(q, 'file').perm & PERM.WRITE, PERM.WRITE);
  await q.setReadOnly(true);
  assert.equal(edgeOf(q, 'file').perm, PERM.CONSISTENT_READ);
  // now a second reader of the same file node is fine
  const r = await g.open({ driver: 'qcow2', 'node-name': 'r', 'read-only': true, file: 'f' }, { monitorOwned: true });
  // and going back to read-write is refused while it reads
  await assert.rejects(q.setReadOnly(false), { message: conflict('f', 'write, resize', "node 'q'", 'file', "node 'r'", 'file') });
  assert.equal(q.readOnly, true);
  assert.equal(edgeOf(q, 'file').perm, PERM.CONSISTENT_READ);
  void r;
  await g.deleteNode('r');
  await q.setReadOnly(false);
  assert.equal(edgeOf(q, 'file').perm & PERM.WRITE, PERM.WRITE);
});
