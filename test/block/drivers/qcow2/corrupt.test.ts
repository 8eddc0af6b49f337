// Corrupt or unsupported images give a clear error naming the problem, never a crash, and
// are never written to.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { newGraph, tempDir } from '../../../helpers/graph.js';
import { needTools, run } from './tools.js';

function patch(path: string, at: number, bytes: Buffer): void {
  const b = readFileSync(path);
  bytes.copy(b, at);
  writeFileSync(path, b);
}
function u64(v: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(v);
  return b;
}
function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v);
  return b;
}

async function openFails(path: string, pattern: RegExp, readOnly = false): Promise<void> {
  const before = readFileSync(path);
  const g = newGraph();
  await assert.rejects(g.open({ driver: 'qcow2', 'read-only': readOnly, file: { driver: 'file', filename: path } }), pattern);
  await g.closeAll();
  assert.ok(readFileSync(path).equals(before), 'the image was not written to');
}

/** A 16 MiB image with data in its first clusters (64 KiB clusters, L1 at 0x30000). */
function dataImage(dir: string, name = 'd.qcow2'): string {
  const p = join(dir, name);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', p, '16M']);
  run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5 0 1M', p]);
  return p;
}

function l2Offset(path: string): number {
  const b = readFileSync(path);
  const l1 = Number(b.readBigUInt64BE(40));
  return Number(b.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
}

test('a truncated header and a bad magic are named', async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const p = dataImage(dir);
  writeFileSync(join(dir, 'short.qcow2'), readFileSync(p).subarray(0, 50));
  await openFails(join(dir, 'short.qcow2'), /truncated header/);
  const v3short = Buffer.from(readFileSync(p).subarray(0, 90));
  writeFileSync(join(dir, 'short3.qcow2'), v3short);
  await openFails(join(dir, 'short3.qcow2'), /truncated header/);
  writeFileSync(join(dir, 'magic.qcow2'), Buffer.concat([Buffer.from('QFI?'), readFileSync(p).subarray(4)]));
  await openFails(join(dir, 'magic.qcow2'), /not in qcow2 format \(bad magic\)/);
  patch(p, 20, u32(30));
  await openFails(p, /Unsupported cluster size: 2\^30/);
});

test('an L2 entry pointing past the end of the file fails reads and writes and is never written', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const p = dataImage(dir);
  const l2 = l2Offset(p);
  patch(p, l2, u64((1n << 63n) | 0x40000000n)); // guest cluster 0 -> 1 GiB, far past the end
  const before = readFileSync(p);
  const g = newGraph();
  const n = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: p } });
  await assert.rejects(n.read(0, 512), /guest cluster 0 points past the end of the file/);
  await assert.rejects(n.write(0, Buffer.alloc(512, 1)), /past the end of the file|image is corrupt/);
  await assert.rejects(n.write(8 * 1024 * 1024, Buffer.alloc(512, 1)), /image is corrupt/);
  assert.equal(n.impl.info!().corrupt, true);
  // other clusters still read
  assert.ok((await n.read(65536, 512)).equals(Buffer.alloc(512, 5)));
  await g.closeAll();
  assert.ok(readFileSync(p).equals(before), 'nothing was written');
});

test('an L2 table past the end of the file is named', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const p = dataImage(dir);
  const l1 = Number(readFileSync(p).readBigUInt64BE(40));
  patch(p, l1, u64((1n << 63n) | 0x10000000n));
  const before = readFileSync(p);
  const g = newGraph();
  const n = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: p } });
  await assert.rejects(n.read(0, 512), /L2 table at 0x10000000 \(L1 entry 0\) lies past the end of the file/);
  await assert.rejects(n.write(0, Buffer.alloc(512)), /corrupt|past the end/);
  await g.closeAll();
  assert.ok(readFileSync(p).equals(before));
});

test('a refcount table overlapping the L1 table or the header is refused at open', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const p = dataImage(dir);
  const l1 = Number(readFileSync(p).readBigUInt64BE(40));
  const q = join(dir, 'q.qcow2');
  writeFileSync(q, readFileSync(p));
  patch(p, 48, u64(BigInt(l1)));
  await openFails(p, /refcount table .* overlaps the L1 table/);
  patch(q, 48, u64(0n));
  await openFails(q, /refcount table offset is 0 \(overlaps the header\)/);
});

test('unsupported features are refused naming the feature', async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const p = join(dir, 'u.qcow2');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', p, '1M']);
  const orig = readFileSync(p);
  const withIncompat = (bits: bigint, name: string): string => {
    const f = join(dir, name);
    writeFileSync(f, orig);
    patch(f, 72, u64(bits));
    return f;
  };
  await openFails(withIncompat(1n << 10n, 'bit10.qcow2'), /does not support: Unknown incompatible feature: bit 10/);
  await openFails(withIncompat(1n << 4n, 'extl2.qcow2'), /does not support: extended L2 entries/);
  await openFails(withIncompat(1n << 2n, 'datafile.qcow2'), /does not support: external data file/);
  const enc = join(dir, 'enc.qcow2');
  writeFileSync(enc, orig);
  patch(enc, 32, u32(2));
  await openFails(enc, /does not support: LUKS encryption/);
  await openFails(enc, /does not support: LUKS encryption/, true);
  const ext = join(dir, 'realextl2.qcow2');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', ext, '1M']);
  await openFails(ext, /extended L2 entries/);
  const zstd = join(dir, 'zstd.qcow2');
  if (run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'compression_type=zstd', zstd, '1M'], { allowFail: true }).status === 0) {
    await openFails(zstd, /compression type zstd/);
  }
  const g = newGraph();
  await assert.rejects(g.open({ driver: 'qcow2', 'data-file': 'x', file: { driver: 'file', filename: p } }), /external data files are not supported/);
  await assert.rejects(g.open({ driver: 'qcow2', bogus: 1, file: { driver: 'file', filename: p } }), /Parameter 'bogus' is unexpected/);
  await g.closeAll();
});

test('an image with the corrupt bit opens read-only only', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const p = dataImage(dir);
  patch(p, 72, u64(2n));
  await openFails(p, /Image is corrupt; cannot be opened read\/write/);
  const g = newGraph();
  const n = await g.open({ driver: 'qcow2', 'read-only': true, file: { driver: 'file', filename: p } });
  assert.ok((await n.read(0, 4096)).equals(Buffer.alloc(4096, 5)));
  assert.equal(n.impl.info!().corrupt, true);
  await g.closeAll();
});
