// checkQcow2 agrees with qemu-img check (clean, leaked and corrupt images), repairs what
// it is asked to, and never writes otherwise.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from '../../../helpers/graph.js';
import { checkQcow2 } from '../../../../src/block/drivers/qcow2/check.js';
import { needTools, run } from './tools.js';

function qemuJson(path: string): Record<string, unknown> {
  const r = run('qemu-img', ['check', '--output=json', path], { allowFail: true });
  const j = JSON.parse(r.stdout) as Record<string, unknown>;
  delete j.filename;
  return j;
}

async function oursJson(path: string, repair?: 'leaks' | 'all'): Promise<Record<string, unknown>> {
  const r = (await checkQcow2(path, repair ? { repair } : {})) as unknown as Record<string, unknown>;
  assert.equal(r.filename, path);
  delete r.filename;
  return r;
}

function image(dir: string): string {
  const p = join(dir, 'c.qcow2');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', p, '8M']);
  run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 1 0 100k', '-c', 'write -P 2 1M 8k', '-c', 'write -P 3 3M 4k', p]);
  return p;
}

function l2Entry(path: string, guestCluster: number): number {
  const b = readFileSync(path);
  const l1 = Number(b.readBigUInt64BE(40));
  const l2 = Number(b.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
  return l2 + guestCluster * 8;
}

test('a clean image: the same report as qemu-img check, also with compressed clusters and snapshots', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const p = image(dir);
  assert.deepEqual(await oursJson(p), qemuJson(p));
  const c = join(dir, 'comp.qcow2');
  run('qemu-img', ['convert', '-c', '-O', 'qcow2', p, c]);
  assert.deepEqual(await oursJson(c), qemuJson(c));
  run('qemu-img', ['snapshot', '-c', 's1', p]);
  run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 9 0 8k', p]);
  assert.deepEqual(await oursJson(p), qemuJson(p));
});

test('leaks are reported like qemu-img and repaired with repair=leaks', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const p = image(dir);
  // drop the mapping of guest cluster 1: its host cluster is now leaked
  const at = l2Entry(p, 1);
  const b = readFileSync(p);
  b.fill(0, at, at + 8);
  writeFileSync(p, b);
  const before = readFileSync(p);
  const ours = await oursJson(p);
  assert.equal(ours.leaks, 1);
  assert.deepEqual(ours, qemuJson(p));
  assert.ok(readFileSync(p).equals(before), 'check without repair does not write');
  const fixed = await oursJson(p, 'leaks');
  assert.equal(fixed['leaks-fixed'], 1);
  assert.equal(fixed.leaks, undefined);
  const q = qemuJson(p);
  assert.equal(q.leaks, undefined);
  assert.equal(q.corruptions, undefined);
});

test('a refcount too low is a corruption, repaired with repair=all', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const p = image(dir);
  const b = readFileSync(p);
  const hostCluster = Number(b.readBigUInt64BE(l2Entry(p, 2)) & 0x00fffffffffffe00n) / 4096;
  const rt = Number(b.readBigUInt64BE(48));
  const block = Number(b.readBigUInt64BE(rt));
  b.writeUInt16BE(0, block + hostCluster * 2);
  writeFileSync(p, b);
  const ours = await oursJson(p);
  const q = qemuJson(p);
  assert.ok((ours.corruptions as number) > 0);
  assert.equal(ours.corruptions, q.corruptions);
  assert.equal(ours['check-errors'], q['check-errors']);
  const fixed = await oursJson(p, 'all');
  assert.equal(fixed.corruptions, undefined);
  assert.ok((fixed['corruptions-fixed'] as number) > 0);
  const after = qemuJson(p);
  assert.equal(after.corruptions, undefined, JSON.stringify(after));
  assert.equal(after.leaks, undefined, JSON.stringify(after));
  const r = run('qemu-io', ['-r', '-f', 'qcow2', '-c', 'read -P 1 0 100k', p]);
  assert.match(r.stdout, /read 102400\/102400/);
});

test('check names a file that is not qcow2', async (t) => {
  const dir = tempDir(t);
  const p = join(dir, 'x.raw');
  writeFileSync(p, Buffer.alloc(4096));
  await assert.rejects(checkQcow2(p), /not in qcow2 format/);
  await assert.rejects(checkQcow2(join(dir, 'missing.qcow2')), /Could not open/);
});
