// make_empty: an overlay holding data becomes fully unallocated and its backing shows
// again; qemu-img check finds it clean; the overlay keeps working afterwards. The fast
// path truncates the file; the swap path renames an empty image prepared beside it over it;
// images with internal snapshots or spread metadata take the slow path (discard everything)
// with the same result.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, linkSync, lstatSync, readdirSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { newGraph, tempDir } from '../../../helpers/graph.js';
import { createQcow2 } from '../../../../src/block/drivers/qcow2/create.js';
import { checkQcow2 } from '../../../../src/block/drivers/qcow2/check.js';
import { needTools, qemuCheck, run } from './tools.js';

const MiB = 1024 * 1024;

function basePattern(size: number): Buffer {
  const b = Buffer.alloc(size);
  for (let i = 0; i < size; i++) b[i] = (i * 7 + (i >> 11)) & 0xff;
  return b;
}

async function fillAndEmpty(t: { after(fn: () => void): void }, overlay: string, size: number, base: Buffer): Promise<void> {
  const g = newGraph();
  const n = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: overlay } });
  try {
    for (let off = 0; off < size; off += 256 * 1024) await n.write(off, Buffer.alloc(64 * 1024, 0xcd));
    await n.writeZeroes(100 * 1024, 64 * 1024);
    await n.flush();
    await n.write(size - 4096, Buffer.alloc(4096, 0xee)); // not flushed before make_empty
    assert.ok((await n.read(0, 16)).equals(Buffer.alloc(16, 0xcd)));
    await n.makeEmpty();
    assert.ok((await n.read(0, size)).equals(base), 'the backing shows through everywhere');
    const s = await n.blockStatus(0, size);
    assert.deepEqual([s.allocated, s.length], [false, size]);
    const chk = qemuCheck(overlay);
    assert.equal(chk.corruptions ?? 0, 0, JSON.stringify(chk));
    assert.equal(chk.leaks ?? 0, 0, JSON.stringify(chk));
    // the overlay keeps working
    await n.write(12345, Buffer.alloc(5000, 0x42));
    base.fill(0x42, 12345, 17345);
    assert.ok((await n.read(0, size)).equals(base));
  } finally {
    await g.closeAll();
  }
  void t;
}

test('make_empty (fast path) empties an overlay holding data and truncates its file', async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const size = 8 * MiB;
  const base = basePattern(size);
  writeFileSync(join(dir, 'base.raw'), base);
  const overlay = join(dir, 'active.qcow2');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', overlay, String(size)]);
  const emptySize = statSync(overlay).size;
  const g = newGraph();
  const n = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: overlay } });
  await n.write(0, Buffer.alloc(size, 1));
  await n.flush();
  assert.ok(statSync(overlay).size > size);
  await n.makeEmpty();
  assert.ok((await n.read(0, size)).equals(base));
  await g.closeAll();
  assert.ok(statSync(overlay).size <= emptySize + 65536, `file truncated (${statSync(overlay).size} bytes)`);
  const chk = qemuCheck(overlay);
  assert.equal(chk.corruptions ?? 0, 0);
  assert.equal(chk.leaks ?? 0, 0);
  await fillAndEmpty(t, overlay, size, Buffer.from(base));
  const ours = await checkQcow2(overlay);
  assert.equal(ours.corruptions ?? 0, 0);
  assert.equal(ours.leaks ?? 0, 0);
});

test('make_empty (slow path) on an image with an internal snapshot keeps the snapshot intact', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const size = 4 * MiB;
  const base = basePattern(size);
  writeFileSync(join(dir, 'base.raw'), base);
  const overlay = join(dir, 'snap.qcow2');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', overlay, String(size)]);
  run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x61 0 1M', overlay]);
  run('qemu-img', ['snapshot', '-c', 'snap1', overlay]);
  await fillAndEmpty(t, overlay, size, Buffer.from(base));
  const chk = qemuCheck(overlay);
  assert.equal(chk.corruptions ?? 0, 0, JSON.stringify(chk));
  assert.equal(chk.leaks ?? 0, 0, JSON.stringify(chk));
  // the snapshot still holds its data
  run('qemu-img', ['snapshot', '-a', 'snap1', overlay]);
  const r = run('qemu-io', ['-r', '-f', 'qcow2', '-c', 'read -P 0x61 0 1M', overlay]);
  assert.match(r.stdout, /read 1048576\/1048576 bytes/);
});

test('make_empty (slow path) when the metadata spans several refcount blocks (512-byte clusters)', async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const size = 2 * MiB;
  const base = basePattern(size);
  writeFileSync(join(dir, 'base.raw'), base);
  const overlay = join(dir, 'small.qcow2');
  await createQcow2(overlay, { size: 64 * MiB, clusterSize: 512, backingFile: 'base.raw', backingFormat: 'raw' });
  const g = newGraph();
  const n = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: overlay } });
  await n.write(0, Buffer.alloc(size, 9));
  await n.write(60 * MiB, Buffer.alloc(4096, 9));
  await n.makeEmpty();
  const expected = Buffer.alloc(64 * MiB);
  base.copy(expected);
  assert.ok((await n.read(0, 64 * MiB)).equals(expected));
  await g.closeAll();
  const chk = qemuCheck(overlay);
  assert.equal(chk.corruptions ?? 0, 0, JSON.stringify(chk));
  assert.equal(chk.leaks ?? 0, 0, JSON.stringify(chk));
});

test('make_empty (swap path) renames a prepared empty image over the overlay: same result, a new file, nothing left beside it', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const size = 8 * MiB;
  const base = basePattern(size);
  writeFileSync(join(dir, 'base.raw'), base);
  const overlay = join(dir, 'active.qcow2');
  const spare = join(dir, '.active.qcow2.lockstep-spare');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', overlay, String(size)]);
  const g = newGraph();
  const n = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: overlay } });
  try {
    await n.write(0, Buffer.alloc(size, 1));
    await n.makeEmpty(); // in place (nothing prepared yet); prepares the empty image for the next one
    await n.settle();
    assert.ok(existsSync(spare), 'an empty image waits beside the overlay');
    for (let round = 0; round < 3; round++) {
      await n.write(round * MiB, Buffer.alloc(3 * MiB, 0x40 + round));
      const before = statSync(overlay).ino;
      await n.makeEmpty();
      assert.notEqual(statSync(overlay).ino, before, `round ${round}: the prepared image took the overlay's name`);
      assert.ok((await n.read(0, size)).equals(base), `round ${round}: the backing shows through everywhere`);
      const s = await n.blockStatus(0, size);
      assert.deepEqual([s.allocated, s.length], [false, size]);
      await n.settle();
    }
    // the overlay keeps working on the new file
    await n.write(12345, Buffer.alloc(5000, 0x42));
    base.fill(0x42, 12345, 17345);
    assert.ok((await n.read(0, size)).equals(base));
  } finally {
    await g.closeAll();
  }
  assert.ok(!existsSync(spare), 'the prepared image is removed at close');
  const chk = qemuCheck(overlay);
  assert.equal(chk.corruptions ?? 0, 0, JSON.stringify(chk));
  assert.equal(chk.leaks ?? 0, 0, JSON.stringify(chk));
  const r = run('qemu-io', ['-r', '-f', 'qcow2', '-c', 'read -P 0x42 12345 5000', '-c', 'read -P 0x01 17345 4096', overlay], { allowFail: true });
  assert.match(r.stdout, /read 5000\/5000 bytes/);
  assert.match(r.stdout + r.stderr, /Pattern verification failed/, 'the data emptied before stays gone');
});

test('make_empty never replaces an overlay reached through a symlink or with a second hard link', async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const size = 4 * MiB;
  const base = basePattern(size);
  writeFileSync(join(dir, 'base.raw'), base);
  const real = join(dir, 'real.qcow2');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', real, String(size)]);
  const link = join(dir, 'link.qcow2');
  symlinkSync('real.qcow2', link);
  const hard = join(dir, 'hard.qcow2');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', hard, String(size)]);
  linkSync(hard, join(dir, 'hard-too.qcow2'));
  for (const overlay of [link, hard]) {
    const ino = statSync(overlay).ino;
    const g = newGraph();
    const n = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: overlay } });
    try {
      for (let round = 0; round < 3; round++) {
        await n.write(0, Buffer.alloc(MiB, 7));
        await n.makeEmpty();
        await n.settle();
        assert.ok((await n.read(0, size)).equals(base));
      }
    } finally {
      await g.closeAll();
    }
    assert.equal(statSync(overlay).ino, ino, `${overlay}: emptied in place`);
    assert.ok(lstatSync(link).isSymbolicLink());
    assert.equal(readdirSync(dir).filter((f) => f.includes('lockstep-spare')).length, 0);
    const chk = qemuCheck(overlay);
    assert.equal(chk.corruptions ?? 0, 0, JSON.stringify(chk));
    assert.equal(chk.leaks ?? 0, 0, JSON.stringify(chk));
  }
});
