// Driver behaviour: info(), options, lazy refcounts and the dirty bit, concurrent writes to
// one unallocated cluster, growing the image, and reopening read-only/read-write.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFileSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { newGraph, tempDir } from '../../../helpers/graph.js';
import { createQcow2 } from '../../../../src/block/drivers/qcow2/create.js';
import { checkQcow2 } from '../../../../src/block/drivers/qcow2/check.js';
import { needTools, qemuCheck, run } from './tools.js';

const MiB = 1024 * 1024;

function dirtyBit(path: string): boolean {
  return (readFileSync(path).readBigUInt64BE(72) & 1n) === 1n;
}

test('info() reports what qemu-img info shows for the format, plus cluster size and backing', async (t) => {
  const dir = tempDir(t);
  const p = join(dir, 'i.qcow2');
  await createQcow2(p, { size: MiB, clusterSize: 4096, refcountBits: 8, lazyRefcounts: true, backingFile: 'b.raw', backingFormat: 'raw' });
  const g = newGraph();
  const n = await g.open({ driver: 'qcow2', backing: null, file: { driver: 'file', filename: p } });
  assert.deepEqual(n.impl.info!(), {
    compat: '1.1',
    'compression-type': 'zlib',
    'lazy-refcounts': true,
    'refcount-bits': 8,
    corrupt: false,
    'extended-l2': false,
    'cluster-size': 4096,
    'backing-filename': 'b.raw',
    'backing-filename-format': 'raw',
    'dirty-flag': false,
  });
  const caps = n.caps;
  assert.deepEqual([caps.writeZeroes, caps.discard, caps.blockStatus, caps.truncate, caps.requestAlignment], [true, true, true, true, 1]);
  await g.closeAll();
  // compat 0.10: the fields qemu-img info shows for v2 images
  const v2 = join(dir, 'v2.qcow2');
  await createQcow2(v2, { size: MiB, compat: '0.10' });
  const m = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: v2 } });
  assert.deepEqual(m.impl.info!(), {
    compat: '0.10',
    'compression-type': 'zlib',
    'refcount-bits': 16,
    'cluster-size': 65536,
    'backing-filename': null,
    'backing-filename-format': null,
    'dirty-flag': false,
  });
  assert.equal(m.caps.writeZeroes, false, 'v2 has no zero clusters: write-zeroes is emulated');
  assert.equal(g.drivers.get('qcow2')?.supportsBacking, true);
  assert.equal(g.drivers.get('qcow2')?.supportsMakeEmpty, true);
  await g.closeAll();
});

test('QEMU option names are accepted, unknown ones and bad values refused', async (t) => {
  const dir = tempDir(t);
  const p = join(dir, 'o.qcow2');
  await createQcow2(p, { size: MiB });
  const g = newGraph();
  const n = await g.open(
    {
      driver: 'qcow2',
      file: { driver: 'file', filename: p },
      'l2-cache-size': '1M',
      'refcount-cache-size': '256k',
      'lazy-refcounts': 'on',
      'pass-discard-request': 'on',
      'pass-discard-other': 'off',
      'pass-discard-snapshot': 'on',
      'cache-clean-interval': '0',
      'overlap-check': 'all',
    },
    { keyval: true },
  );
  await n.write(0, Buffer.alloc(512, 1));
  await g.closeAll();
  await assert.rejects(g.open({ driver: 'qcow2', file: { driver: 'file', filename: p }, 'l2-cache-sizes': 1 }), /Parameter 'l2-cache-sizes' is unexpected/);
  await assert.rejects(g.open({ driver: 'qcow2', file: { driver: 'file', filename: p }, 'lazy-refcounts': 'maybe' }), /expected: boolean/);
  await assert.rejects(g.open({ driver: 'qcow2' }), /Parameter 'file' is missing/);
  const v2 = join(dir, 'v2.qcow2');
  await createQcow2(v2, { size: MiB, compat: '0.10' });
  await assert.rejects(g.open({ driver: 'qcow2', file: { driver: 'file', filename: v2 }, 'lazy-refcounts': true }), /Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level/);
  await g.closeAll();
});

test('lazy refcounts: the dirty bit is set while writing and cleared on close', async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const p = join(dir, 'lazy.qcow2');
  await createQcow2(p, { size: 4 * MiB, lazyRefcounts: true });
  const g = newGraph();
  const n = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: p } });
  assert.equal(dirtyBit(p), false);
  await n.write(0, Buffer.alloc(MiB, 3));
  await n.flush();
  assert.equal(dirtyBit(p), true);
  assert.equal(n.impl.info!()['dirty-flag'], true);
  await g.closeAll();
  assert.equal(dirtyBit(p), false);
  const chk = qemuCheck(p);
  assert.equal(chk.corruptions ?? 0, 0);
  assert.equal(chk.leaks ?? 0, 0);
  // without lazy refcounts the dirty bit is never touched
  const q = join(dir, 'eager.qcow2');
  await createQcow2(q, { size: 4 * MiB });
  const m = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: q } });
  await m.write(0, Buffer.alloc(MiB, 3));
  await m.flush();
  assert.equal(dirtyBit(q), false);
  await g.closeAll();
});

/**
 * Opens `p` read-write once the killed writer's image lock is gone. The kernel drops the file
 * references of a killed process's io_uring requests in a work queue after the process is
 * reaped, so its OFD lock can outlive the exit event by a few milliseconds; only that lock
 * conflict is retried, for up to 5 s.
 */
async function openOnceUnlocked(g: ReturnType<typeof newGraph>, p: string): Promise<void> {
  for (let attempt = 0; ; attempt++) {
    try {
      await g.open({ driver: 'qcow2', file: { driver: 'file', filename: p } });
      return;
    } catch (e) {
      if (!/Failed to get "write" lock/.test((e as Error).message) || attempt >= 100) throw e;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

test('a dirty lazy-refcounts image killed mid-write is repaired when opened read-write', async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const p = join(dir, 'lazycrash.qcow2');
  await createQcow2(p, { size: 16 * MiB, clusterSize: 4096, lazyRefcounts: true });
  const writer = join(dirname(fileURLToPath(import.meta.url)), 'crash-writer.js');
  await new Promise<void>((resolve, reject) => {
    const child = spawn(process.execPath, [writer, p, '1', '4'], { stdio: ['ignore', 'pipe', 'inherit'] });
    let timer: NodeJS.Timeout | null = null;
    child.stdout.on('data', () => (timer ??= setTimeout(() => child.kill('SIGKILL'), 150)));
    child.on('error', reject);
    child.on('exit', () => resolve());
  });
  assert.equal(dirtyBit(p), true, 'the killed writer left the image dirty');
  const g = newGraph();
  await openOnceUnlocked(g, p);
  await g.closeAll();
  assert.equal(dirtyBit(p), false);
  const chk = qemuCheck(p);
  assert.equal(chk.corruptions ?? 0, 0, JSON.stringify(chk));
  assert.equal(chk.leaks ?? 0, 0, JSON.stringify(chk));
});

test('concurrent writes into one unallocated cluster allocate it once and keep every byte', async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const base = Buffer.alloc(MiB);
  for (let i = 0; i < base.length; i++) base[i] = i & 0xff;
  const p = join(dir, 'conc.qcow2');
  run('qemu-img', ['create', '-q', '-f', 'raw', join(dir, 'base.raw'), '1M']);
  const g0 = newGraph();
  const raw = await g0.open({ driver: 'raw', file: { driver: 'file', filename: join(dir, 'base.raw') } });
  await raw.write(0, base);
  await g0.closeAll();
  await createQcow2(p, { size: MiB, backingFile: 'base.raw', backingFormat: 'raw' });
  const g = newGraph();
  const n = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: p } });
  const expected = Buffer.from(base);
  const writes: Promise<void>[] = [];
  for (let k = 0; k < 32; k++) {
    const off = 65536 + k * 1000;
    writes.push(n.write(off, Buffer.alloc(100, 0x80 + k)));
    expected.fill(0x80 + k, off, off + 100);
  }
  await Promise.all(writes);
  assert.ok((await n.read(0, MiB)).equals(expected));
  await g.closeAll();
  const chk = qemuCheck(p);
  assert.equal(chk['allocated-clusters'], 1, JSON.stringify(chk));
  assert.equal(chk.corruptions ?? 0, 0);
  assert.equal(chk.leaks ?? 0, 0);
});

test('truncate grows the image (and its L1 table); shrinking is refused', async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const p = join(dir, 'grow.qcow2');
  await createQcow2(p, { size: MiB, clusterSize: 512 });
  const g = newGraph();
  const n = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: p } });
  await n.write(0, Buffer.alloc(MiB, 1));
  await n.truncate(64 * MiB);
  assert.equal(n.getLength(), 64 * MiB);
  await n.write(63 * MiB, Buffer.alloc(MiB, 2));
  assert.ok((await n.read(MiB - 512, 1024)).equals(Buffer.concat([Buffer.alloc(512, 1), Buffer.alloc(512)])));
  await assert.rejects(n.truncate(MiB), /shrinking/);
  await g.closeAll();
  const chk = qemuCheck(p);
  assert.equal(chk.corruptions ?? 0, 0, JSON.stringify(chk));
  assert.equal(chk.leaks ?? 0, 0, JSON.stringify(chk));
  const info = JSON.parse(run('qemu-img', ['info', '--output=json', p]).stdout) as { 'virtual-size': number };
  assert.equal(info['virtual-size'], 64 * MiB);
  const r = run('qemu-io', ['-r', '-f', 'qcow2', '-c', 'read -P 2 63M 1M', '-c', 'read -P 1 0 1M', p]);
  assert.match(r.stdout, /read 1048576\/1048576 bytes at offset 66060288/);
  assert.equal((await checkQcow2(p)).corruptions, undefined);
});

test('reopen read-only flushes and refuses writes; read-write again works', async (t) => {
  const dir = tempDir(t);
  const p = join(dir, 'ro.qcow2');
  await createQcow2(p, { size: MiB });
  const g = newGraph();
  const n = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: p } });
  await n.write(0, Buffer.alloc(4096, 7));
  await n.setReadOnly(true);
  await assert.rejects(n.write(0, Buffer.alloc(1)), /read-only/);
  await n.setReadOnly(false);
  await n.write(4096, Buffer.alloc(4096, 8));
  assert.ok((await n.read(0, 8192)).equals(Buffer.concat([Buffer.alloc(4096, 7), Buffer.alloc(4096, 8)])));
  await g.closeAll();
});

test('the refcount table grows when the file outgrows it (512-byte clusters, 16- and 64-bit refcounts)', async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  const dir = tempDir(t);
  for (const refcountBits of [16, 64]) {
    const p = join(dir, `grow${refcountBits}.qcow2`);
    await createQcow2(p, { size: 16 * MiB, clusterSize: 512, refcountBits });
    const before = readFileSync(p).readUInt32BE(56);
    const g = newGraph();
    const n = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: p }, 'refcount-cache-size': 65536, 'l2-cache-size': 65536 });
    const expected = Buffer.alloc(16 * MiB);
    for (let off = 0, k = 0; off < 12 * MiB; off += 96 * 1024, k++) {
      const b = Buffer.alloc(64 * 1024 + 100, k & 0xff);
      await n.write(off + 37, b);
      b.copy(expected, off + 37);
      if (k % 64 === 0) await n.flush();
    }
    await n.discard(MiB, MiB);
    expected.fill(0, MiB, 2 * MiB);
    assert.ok((await n.read(0, 16 * MiB)).equals(expected));
    await g.closeAll();
    const header = readFileSync(p);
    assert.ok(header.readUInt32BE(56) > before, `the refcount table grew (${refcountBits} bits)`);
    const chk = qemuCheck(p);
    assert.equal(chk.corruptions ?? 0, 0, JSON.stringify(chk));
    assert.equal(chk.leaks ?? 0, 0, JSON.stringify(chk));
    const model = join(dir, `model${refcountBits}.raw`);
    const { writeFileSync } = await import('node:fs');
    writeFileSync(model, expected);
    assert.equal(run('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'raw', p, model], { allowFail: true }).status, 0);
  }
});

test('unknown header extensions and header fields survive a header rewrite', async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const p = join(dir, 'ext.qcow2');
  await createQcow2(p, { size: MiB, backingFile: 'base.raw', backingFormat: 'raw' });
  const { writeFileSync } = await import('node:fs');
  // rebuild the first cluster by hand: header (with 8 unknown header bytes), backing format,
  // an unknown extension, the end marker, the backing name
  const img = readFileSync(p);
  const header = Buffer.from(img.subarray(0, 112));
  header.writeUInt32BE(120, 100);
  const unknownField = Buffer.from('8bytes!!');
  const ext = (type: number, data: Buffer): Buffer => {
    const b = Buffer.alloc(8 + Math.ceil(data.length / 8) * 8);
    b.writeUInt32BE(type, 0);
    b.writeUInt32BE(data.length, 4);
    data.copy(b, 8);
    return b;
  };
  const unknownExt = ext(0x12345678, Buffer.from('keep me around'));
  const parts = [header, unknownField, ext(0xe2792aca, Buffer.from('raw')), unknownExt, Buffer.alloc(8)];
  const backingOffset = parts.reduce((n, b) => n + b.length, 0);
  header.writeBigUInt64BE(BigInt(backingOffset), 8);
  const first = Buffer.concat([...parts, Buffer.from('base.raw')]);
  first.copy(img, 0);
  img.fill(0, first.length, 65536);
  writeFileSync(p, img);
  writeFileSync(join(dir, 'base.raw'), Buffer.alloc(MiB, 1));
  const g = newGraph();
  const n = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: p } });
  assert.ok((await n.read(0, 10)).equals(Buffer.alloc(10, 1)));
  await n.truncate(2 * MiB); // rewrites the header
  await g.closeAll();
  const after = readFileSync(p).subarray(0, 65536);
  assert.ok(after.includes(Buffer.from('keep me around')), 'the unknown extension is kept');
  assert.ok(after.subarray(112, 120).equals(unknownField), 'the unknown header field is kept');
  const info = JSON.parse(run('qemu-img', ['info', '--output=json', p]).stdout) as { 'virtual-size': number; 'backing-filename': string };
  assert.equal(info['virtual-size'], 2 * MiB);
  assert.equal(info['backing-filename'], 'base.raw');
  assert.equal(qemuCheck(p).corruptions ?? 0, 0);
});

test('hundreds of concurrent writes (disjoint bytes, shared clusters) with zeroes and discards elsewhere', async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const size = 4 * MiB;
  const base = Buffer.alloc(size);
  for (let i = 0; i < size; i++) base[i] = (i * 11 + (i >> 9)) & 0xff;
  const { writeFileSync } = await import('node:fs');
  writeFileSync(join(dir, 'base.raw'), base);
  const p = join(dir, 'stress.qcow2');
  await createQcow2(p, { size, clusterSize: 4096, backingFile: 'base.raw', backingFormat: 'raw' });
  const g = newGraph();
  const n = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: p } });
  const expected = Buffer.from(base);
  // the first 3 MiB cut into random disjoint pieces, written all at once in random order
  let x = 12345;
  const rnd = (m: number): number => ((x = (x * 1103515245 + 12345) >>> 0) % m);
  const pieces: Array<[number, number]> = [];
  for (let pos = 0; pos < 3 * MiB; ) {
    const len = 1 + rnd(9000);
    pieces.push([pos, Math.min(len, 3 * MiB - pos)]);
    pos += len;
  }
  for (let i = pieces.length - 1; i > 0; i--) {
    const j = rnd(i + 1);
    [pieces[i], pieces[j]] = [pieces[j]!, pieces[i]!];
  }
  const ops: Promise<void>[] = [];
  for (const [off, len] of pieces) {
    const fill = (off >> 3) & 0xff;
    ops.push(n.write(off, Buffer.alloc(len, fill)));
    expected.fill(fill, off, off + len);
  }
  ops.push(n.writeZeroes(3 * MiB, 256 * 1024));
  expected.fill(0, 3 * MiB, 3 * MiB + 256 * 1024);
  ops.push(n.discard(3 * MiB + 512 * 1024, 256 * 1024));
  expected.fill(0, 3 * MiB + 512 * 1024, 3 * MiB + 768 * 1024);
  await Promise.all(ops);
  assert.ok((await n.read(0, size)).equals(expected));
  await g.closeAll();
  const chk = qemuCheck(p);
  assert.equal(chk.corruptions ?? 0, 0, JSON.stringify(chk));
  assert.equal(chk.leaks ?? 0, 0, JSON.stringify(chk));
  // zero clusters without a host cluster do not count as allocated
  assert.equal(chk['allocated-clusters'], 3 * 256, JSON.stringify(chk));
  writeFileSync(join(dir, 'model.raw'), expected);
  assert.equal(run('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'raw', p, join(dir, 'model.raw')], { allowFail: true }).status, 0);
});

test('every refcount width from 1 to 64 bits allocates, frees and checks clean', async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  const dir = tempDir(t);
  for (const refcountBits of [1, 2, 4, 8, 16, 32, 64]) {
    const p = join(dir, `w${refcountBits}.qcow2`);
    await createQcow2(p, { size: 8 * MiB, clusterSize: 4096, refcountBits });
    const g = newGraph();
    const n = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: p } });
    await n.write(0, Buffer.alloc(3 * MiB, 0x31));
    await n.flush();
    await n.discard(MiB, MiB);
    await n.flush(); // frees take effect once the L2 tables no longer pointing at them are written
    // 256 clusters mapped by an existing L2 table: they fit exactly into the freed run
    await n.write(3 * MiB, Buffer.alloc(MiB, 0x32));
    const expected = Buffer.alloc(8 * MiB);
    expected.fill(0x31, 0, 3 * MiB).fill(0, MiB, 2 * MiB).fill(0x32, 3 * MiB, 4 * MiB);
    assert.ok((await n.read(0, 8 * MiB)).equals(expected), `${refcountBits} bits: content`);
    await g.closeAll();
    const chk = qemuCheck(p);
    assert.equal(chk.corruptions ?? 0, 0, `${refcountBits} bits: ${JSON.stringify(chk)}`);
    assert.equal(chk.leaks ?? 0, 0, `${refcountBits} bits: ${JSON.stringify(chk)}`);
    // 3 MiB written, 1 MiB discarded, 1 MiB written again: 3 MiB + metadata if reused
    assert.ok((chk['image-end-offset'] ?? 0) < 3.5 * MiB, `${refcountBits} bits: freed clusters were reused (end ${chk['image-end-offset']})`);
  }
});

test('small writes into new clusters: zero-range plus the data, the same file and map as QEMU', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const ours = join(dir, 'ours.qcow2');
  const theirs = join(dir, 'theirs.qcow2');
  await createQcow2(ours, { size: 4 * MiB });
  run('qemu-img', ['create', '-q', '-f', 'qcow2', theirs, '4M']);
  const g = newGraph();
  t.after(() => g.closeAll());
  let n = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: ours } });
  // 4 KiB inside cluster 0, a write across clusters 2-3, then cluster 0 discarded (its
  // host cluster is free with old data in it) and, reopened, reused by a 10-byte write
  await n.write(8192, Buffer.alloc(4096, 0xaa));
  await n.write(2 * 65536 + 60000, Buffer.alloc(10000, 0xcc));
  await n.discard(0, 65536);
  await g.closeAll();
  n = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: ours } });
  await n.write(65536 + 100, Buffer.alloc(10, 0xbb));
  const c1 = await n.read(65536, 65536);
  const want1 = Buffer.alloc(65536);
  want1.fill(0xbb, 100, 110);
  assert.ok(c1.equals(want1), `cluster 1 differs at byte ${c1.findIndex((b, i) => b !== want1[i])}: old data showed through`);
  await g.closeAll();
  run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0xaa 8192 4096', '-c', `write -P 0xcc ${2 * 65536 + 60000} 10000`, '-c', 'discard 0 64k', theirs]);
  run('qemu-io', ['-f', 'qcow2', '-c', `write -P 0xbb ${65536 + 100} 10`, theirs]);
  const r = qemuCheck(ours);
  assert.deepEqual([r['check-errors'], r.corruptions ?? 0, r.leaks ?? 0], [0, 0, 0]);
  const map = (f: string) => run('qemu-img', ['map', '--output=json', f]).stdout;
  assert.equal(map(ours), map(theirs));
  assert.equal(statSync(ours).size, statSync(theirs).size);
  assert.equal(run('qemu-img', ['compare', ours, theirs]).status, 0);
});

test('a flush with metadata to write back syncs the data first, without the mutex: writes into new clusters go on while that sync is slow', async (t) => {
  const dir = tempDir(t);
  const p = join(dir, 'flush.qcow2');
  await createQcow2(p, { size: 64 * MiB });
  const g = newGraph();
  t.after(() => g.closeAll());
  const n = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: p, 'node-name': 'f' } });
  // new clusters: refcount and L2 updates wait in the caches for the next flush
  for (let k = 0; k < 8; k++) await n.write(k * MiB, Buffer.alloc(4096, 0x10 + k));
  // the file's first sync is slow (a loaded disk) until we let it go
  const file = g.getNode('f');
  const realFlush = file.impl.flush!.bind(file.impl);
  let letGo!: () => void;
  const gate = new Promise<void>((r) => (letGo = r));
  let syncs = 0;
  file.impl.flush = async () => {
    if (syncs++ === 0) await gate;
    return realFlush();
  };
  const flushed = n.flush();
  for (let i = 0; i < 400 && syncs === 0; i++) await new Promise((r) => setTimeout(r, 5));
  assert.equal(syncs, 1, 'the flush syncs the file');
  // a write into a new cluster while that sync waits: it allocates, so it needs the mutex
  let wrote = false;
  const write = n.write(20 * MiB + 512, Buffer.alloc(4096, 0x77)).then(() => (wrote = true));
  for (let i = 0; i < 400 && !wrote; i++) await new Promise((r) => setTimeout(r, 5));
  assert.ok(wrote, 'the write went on while the flush waited for its first sync');
  letGo();
  await Promise.all([flushed, write]);
  for (let k = 0; k < 8; k++) assert.ok((await n.read(k * MiB, 4096)).equals(Buffer.alloc(4096, 0x10 + k)));
  assert.ok((await n.read(20 * MiB + 512, 4096)).equals(Buffer.alloc(4096, 0x77)));
  await g.closeAll();
  const chk = await checkQcow2(p);
  assert.equal(chk.corruptions ?? 0, 0, JSON.stringify(chk));
  assert.equal(chk.leaks ?? 0, 0, JSON.stringify(chk));
});
