// Images written by QEMU read back exactly through lockstep: qemu-io pattern writes,
// compressed images from qemu-img convert -c, 512-byte and 2 MiB clusters, zero clusters,
// backing chains named in the header, and block status.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { newGraph, tempDir } from '../../../helpers/graph.js';
import { needTools, run } from './tools.js';
import { createQcow2 } from '../../../../src/block/drivers/qcow2/create.js';

const MiB = 1024 * 1024;

function patterned(length: number, seed: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i++) b[i] = (seed + i * 29 + (i >> 12) * 3) & 0xff;
  return b;
}

async function readAll(path: string, extra: Record<string, unknown> = {}): Promise<Buffer> {
  const g = newGraph();
  const n = await g.open({ driver: 'qcow2', 'read-only': true, file: { driver: 'file', filename: path }, ...extra });
  try {
    return await n.read(0, n.getLength());
  } finally {
    await g.closeAll();
  }
}

for (const cluster of ['512', '64k', '2M']) {
  test(`qemu-io pattern writes in a ${cluster}-cluster image read back exactly`, async (t) => {
    if (!needTools(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const img = join(dir, 'q.qcow2');
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cluster}`, img, '8M']);
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 1000', '-c', 'write -P 0x22 4096 70000', '-c', 'write -P 0x33 3M 1M', '-c', 'write -z 3200k 100k', '-c', 'write -P 0x44 8388096 512', img]);
    const expected = Buffer.alloc(8 * MiB);
    expected.fill(0x11, 0, 1000);
    expected.fill(0x22, 4096, 4096 + 70000);
    expected.fill(0x33, 3 * MiB, 4 * MiB);
    expected.fill(0, 3200 * 1024, 3300 * 1024);
    expected.fill(0x44, 8388096, 8 * MiB);
    assert.ok((await readAll(img)).equals(expected));
  });
}

test('compressed clusters (qemu-img convert -c) decompress exactly, at 512 B, 64 KiB and 2 MiB clusters', async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const raw = join(dir, 'src.raw');
  const data = Buffer.concat([patterned(MiB, 5), Buffer.alloc(MiB), Buffer.alloc(MiB / 2, 0x5a), patterned(MiB / 2 - 512, 9), Buffer.alloc(512, 1)]);
  writeFileSync(raw, data);
  for (const cs of ['512', '65536', '2M']) {
    const img = join(dir, `c${cs}.qcow2`);
    run('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${cs}`, raw, img]);
    const info = JSON.parse(run('qemu-img', ['check', '--output=json', img]).stdout) as { 'compressed-clusters'?: number };
    assert.ok((info['compressed-clusters'] ?? 0) > 0, `cluster size ${cs}: the image has compressed clusters`);
    assert.ok((await readAll(img)).equals(data), `cluster size ${cs}: content differs`);
  }
});

test('writing over compressed clusters copies them out and frees them', async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const raw = join(dir, 'src.raw');
  const data = patterned(2 * MiB, 77);
  writeFileSync(raw, data);
  const img = join(dir, 'c.qcow2');
  run('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4096', raw, img]);
  const g = newGraph();
  const n = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: img } });
  await n.write(5000, Buffer.alloc(100, 0xee));
  await n.writeZeroes(40960, 8192);
  await g.closeAll();
  data.fill(0xee, 5000, 5100);
  data.fill(0, 40960, 40960 + 8192);
  assert.ok((await readAll(img)).equals(data));
  const chk = JSON.parse(run('qemu-img', ['check', '--output=json', img]).stdout) as { corruptions?: number; leaks?: number };
  assert.equal(chk.corruptions ?? 0, 0);
  assert.equal(chk.leaks ?? 0, 0);
});

test('a backing chain named in the header opens (relative name, format extension and probing)', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  run('qemu-img', ['create', '-q', '-f', 'raw', join(dir, 'base.raw'), '4M']);
  run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x01 0 4M', join(dir, 'base.raw')]);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', join(dir, 'mid.qcow2'), '4M']);
  run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x02 1M 1M', join(dir, 'mid.qcow2')]);
  // top names mid without a format: lockstep probes it (qcow2 magic)
  await createQcow2(join(dir, 'top.qcow2'), { size: 6 * MiB, backingFile: 'mid.qcow2' });
  run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x03 1536k 1M', join(dir, 'top.qcow2')]);
  const expected = Buffer.alloc(6 * MiB);
  expected.fill(1, 0, 4 * MiB).fill(2, MiB, 2 * MiB).fill(3, 1536 * 1024, 2560 * 1024);
  const g = newGraph();
  const top = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: join(dir, 'top.qcow2') } });
  try {
    assert.ok((await top.read(0, 6 * MiB)).equals(expected));
    assert.equal(top.backing?.driver.name, 'qcow2');
    assert.equal(top.backing?.backing?.driver.name, 'raw');
    assert.equal(top.backing?.readOnly, true);
    const info = top.impl.info!();
    assert.equal(info['backing-filename'], 'mid.qcow2');
    assert.equal(info['backing-filename-format'], null);
    // block status: top's own data, unallocated (backing) and, past the backing, zero
    const s0 = await top.blockStatus(0, 6 * MiB);
    assert.deepEqual([s0.allocated, s0.length], [false, 1536 * 1024]);
    const s1 = await top.blockStatus(1536 * 1024, MiB);
    assert.equal(s1.allocated, true);
    assert.equal(s1.data, true);
    assert.equal(s1.file, top.file);
    assert.ok(typeof s1.hostOffset === 'number' && s1.hostOffset > 0);
    const hostBytes = await top.file!.read(s1.hostOffset!, 4096);
    assert.ok(hostBytes.equals(Buffer.alloc(4096, 3)), 'hostOffset points at the data in file');
  } finally {
    await g.closeAll();
  }
  // backing=null: no backing at all
  const own = await readAll(join(dir, 'top.qcow2'), { backing: null });
  const ownExpected = Buffer.alloc(6 * MiB).fill(3, 1536 * 1024, 2560 * 1024);
  assert.ok(own.equals(ownExpected));
});

test('backing given as a node-name reference or an inline dict overrides the header', async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  const dir = tempDir(t);
  writeFileSync(join(dir, 'other.raw'), Buffer.alloc(MiB, 0x77));
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', 'missing.raw', '-F', 'raw', join(dir, 'top.qcow2'), '1M']);
  const g = newGraph();
  try {
    await assert.rejects(g.open({ driver: 'qcow2', file: { driver: 'file', filename: join(dir, 'top.qcow2') } }), /missing\.raw/);
    await g.open({ driver: 'raw', 'node-name': 'other', 'read-only': true, file: { driver: 'file', filename: join(dir, 'other.raw') } }, { monitorOwned: true });
    const byRef = await g.open({ driver: 'qcow2', 'read-only': true, backing: 'other', file: { driver: 'file', filename: join(dir, 'top.qcow2') } });
    assert.ok((await byRef.read(0, MiB)).equals(Buffer.alloc(MiB, 0x77)));
    assert.equal(byRef.backing, g.getNode('other'));
    const inline = await g.open({
      driver: 'qcow2',
      'read-only': true,
      backing: { driver: 'raw', file: { driver: 'file', filename: join(dir, 'other.raw') } },
      file: { driver: 'file', filename: join(dir, 'top.qcow2') },
    });
    assert.ok((await inline.read(1000, 10)).equals(Buffer.alloc(10, 0x77)));
  } finally {
    await g.closeAll();
  }
});

test('partial writes into unallocated clusters copy the rest from the backing view', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const base = patterned(2 * MiB, 3);
  writeFileSync(join(dir, 'base.raw'), base);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', '-b', 'base.raw', '-F', 'raw', join(dir, 'top.qcow2'), '2M']);
  const g = newGraph();
  const n = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: join(dir, 'top.qcow2') } });
  await n.write(70000, Buffer.alloc(10, 0xaa));
  await g.closeAll();
  // with backing=null the overlay's own cluster shows: backing bytes around the write
  const own = await readAll(join(dir, 'top.qcow2'), { backing: null });
  const cluster = Buffer.from(base.subarray(65536, 131072));
  cluster.fill(0xaa, 70000 - 65536, 70010 - 65536);
  assert.ok(own.subarray(65536, 131072).equals(cluster));
  assert.ok(own.subarray(0, 65536).equals(Buffer.alloc(65536)));
  const r = run('qemu-io', ['-r', '-f', 'qcow2', '-c', 'read -P 0xaa 70000 10', join(dir, 'top.qcow2')]);
  assert.match(r.stdout, /read 10\/10 bytes/);
});
