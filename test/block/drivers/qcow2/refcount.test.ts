// A read-only qcow2 open checks the refcount table as a read-write open does but does not
// keep it (a deep chain of backing files held one table per layer): reads need none, and a
// reopen for writing loads it before the first write, so the overlap checks see every
// refcount block exactly as after a read-write open.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { newGraph, tempDir } from '../../../helpers/graph.js';
import { FsHostFile } from '../../../../src/block/drivers/qcow2/host-file.js';
import { readHeader } from '../../../../src/block/drivers/qcow2/header.js';
import { Qcow2Image } from '../../../../src/block/drivers/qcow2/image.js';
import { readRange } from '../../../../src/block/drivers/qcow2/io.js';
import { needTools, run } from './tools.js';

/** A 16 MiB image (64 KiB clusters: refcount table 0x10000, block 0x20000, L1 0x30000). */
function dataImage(dir: string, name: string): string {
  const p = join(dir, name);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', p, '16M']);
  run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5 0 1M', '-c', 'write -P 0x6 9M 64k', p]);
  return p;
}

function patchU64(path: string, at: number, v: bigint): void {
  const b = readFileSync(path);
  b.writeBigUInt64BE(v, at);
  writeFileSync(path, b);
}

async function openImage(path: string, lazy: boolean): Promise<{ img: Qcow2Image; file: FsHostFile }> {
  const file = await FsHostFile.open(path, false);
  const img = new Qcow2Image(file, await readHeader(file), { readOnly: true, lazyRefcountTable: lazy });
  await img.load();
  return { img, file };
}

test('a read-only open keeps no refcount table, reads without one, and loads the same table when asked', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const p = dataImage(dir, 'd.qcow2');
  const lazy = await openImage(p, true);
  const eager = await openImage(p, false);
  t.after(() => lazy.file.close());
  t.after(() => eager.file.close());
  assert.equal(lazy.img.refcounts.loaded, false);
  assert.throws(() => lazy.img.refcounts.table, /refcount table is loaded before it is used/);
  const expect = Buffer.alloc(10 * 1024 * 1024);
  expect.fill(5, 0, 1024 * 1024);
  expect.fill(6, 9 * 1024 * 1024, 9 * 1024 * 1024 + 65536);
  assert.ok((await readRange(lazy.img, 0, expect.length)).equals(expect), 'guest bytes');
  assert.equal(lazy.img.refcounts.loaded, false, 'reads load nothing');
  await lazy.img.loadRefcountTable();
  assert.equal(lazy.img.refcounts.loaded, true);
  assert.deepEqual(lazy.img.refcounts.table, eager.img.refcounts.table);
  assert.equal(lazy.img.refcounts.usedEntries(), 1);
});

test('a read-only open refuses a bad refcount table entry with the read-write open message', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const cases: Array<[string, bigint, RegExp]> = [
    ['unaligned.qcow2', 0x20200n, /refcount block offset 0x20200 \(refcount table entry 1\) is invalid/],
    ['past-end.qcow2', 0x4000000n, /refcount block 1 at 0x4000000 lies past the end of the file/],
    ['on-table.qcow2', 0x10000n, /refcount block 1 at 0x10000 overlaps other metadata/],
  ];
  for (const [name, entry, message] of cases) {
    const p = dataImage(dir, name);
    patchU64(p, 0x10008, entry);
    const before = readFileSync(p);
    for (const readOnly of [true, false]) {
      const g = newGraph();
      await assert.rejects(g.open({ driver: 'qcow2', 'read-only': readOnly, file: { driver: 'file', filename: p } }), message, `${name} read-only=${readOnly}`);
      await g.closeAll();
    }
    assert.ok(readFileSync(p).equals(before), `${name} was not written to`);
  }
});

test('reopened read-write, a read-only node writes as QEMU reads it and its overlap checks see the refcount blocks', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const good = dataImage(dir, 'good.qcow2');
  const g = newGraph();
  const n = await g.open({ driver: 'qcow2', 'read-only': true, file: { driver: 'file', filename: good } });
  await assert.rejects(n.write(0, Buffer.alloc(1)), /read-only/);
  await n.setReadOnly(false);
  await n.write(2 * 1024 * 1024, Buffer.alloc(65536, 0x7a));
  await g.closeAll();
  run('qemu-io', ['-r', '-f', 'qcow2', '-c', 'read -P 0x7a 2M 64k', '-c', 'read -P 0x5 0 1M', good]);
  assert.equal(run('qemu-img', ['check', good]).status, 0);

  // L1 entry 0 (COPIED) points at the refcount block: changing that "L2 table" in place is a
  // write onto the refcount block, refused as after a read-write open
  for (const readOnlyFirst of [true, false]) {
    const p = dataImage(dir, `hostile-${readOnlyFirst}.qcow2`);
    patchU64(p, 0x30000, (1n << 63n) | 0x20000n);
    const h = newGraph();
    const m = await h.open({ driver: 'qcow2', 'read-only': readOnlyFirst, file: { driver: 'file', filename: p } });
    if (readOnlyFirst) await m.setReadOnly(false);
    await assert.rejects(m.write(0, Buffer.alloc(512, 1)), /Preventing invalid write on metadata \(overlaps with refcount block\)/, `read-only first: ${readOnlyFirst}`);
    await h.closeAll();
  }
});
