// Hostile qcow2 images (issue 15, items 3-5): each crafted image is given to qemu-io /
// qemu-img and to lockstep io / lockstep img on separate copies; the messages, exit codes and
// what happens to the file must be QEMU's.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from '../../../helpers/graph.js';
import { LOCKSTEP_BIN } from '../../../helpers/daemon.js';
import { needTools, run } from './tools.js';

function lockstep(args: string[]): { status: number; stdout: string; stderr: string } {
  return run(process.execPath, [LOCKSTEP_BIN, ...args], { allowFail: true });
}

function patch(path: string, at: number, bytes: Buffer): void {
  const b = readFileSync(path);
  bytes.copy(b, at);
  writeFileSync(path, b);
}
const u64 = (v: bigint): Buffer => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(v);
  return b;
};
const u32 = (v: number): Buffer => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v);
  return b;
};

/** 64 MiB, 64 KiB clusters: refcount table 0x10000, refcount block 0x20000, L1 0x30000, L2 0x40000, data 0x50000 */
function baseImage(dir: string): string {
  const p = join(dir, 'base.qcow2');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', p, '64M']);
  run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 64k', p]);
  return p;
}

/** Runs the same qemu-io / lockstep io commands on two copies of `image`; compares everything. */
function sameIo(dir: string, image: string, name: string, cmds: string[][]): { q: string; l: string } {
  const q = join(dir, `${name}-qemu.qcow2`);
  const l = join(dir, `${name}-lockstep.qcow2`);
  copyFileSync(image, q);
  copyFileSync(image, l);
  for (const c of cmds) {
    const qr = run('qemu-io', ['-f', 'qcow2', ...c.flatMap((x) => ['-c', x]), q], { allowFail: true });
    const lr = lockstep(['io', '-f', 'qcow2', ...c.flatMap((x) => ['-c', x]), l]);
    const what = `${name}: ${JSON.stringify(c)}`;
    assert.equal(lr.stderr.replace(/^lockstep io: /gm, 'qemu-io: ').replaceAll(l, q), qr.stderr, `stderr of ${what}`);
    assert.equal(lr.stdout.replace(/\d+\.\d+ sec \([^)]*\)/g, 'T'), qr.stdout.replace(/\d+\.\d+ sec \([^)]*\)/g, 'T'), `stdout of ${what}`);
    assert.equal(lr.status, qr.status, `exit status of ${what}`);
  }
  return { q, l };
}

const CORRUPT_BIT_BYTE = 79; // the last byte of incompatible_features

test('writes onto metadata are prevented and mark the image corrupt, as QEMU does', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const base = baseImage(dir);
  const cases: Array<[string, number, bigint]> = [
    ['l1-to-refcount-table', 0x30000, (1n << 63n) | 0x10000n], // L1[0] -> the refcount table (COPIED)
    ['l1-to-refcount-table-shared', 0x30000, 0x10000n], // the same without COPIED: the table is copied, then freed
    ['refcount-entry-zero', 0x10000, 0n], // refcount block 0 is gone: its clusters look free
  ];
  for (const [name, at, value] of cases) {
    const img = join(dir, `${name}.qcow2`);
    copyFileSync(base, img);
    patch(img, at, u64(value));
    const { q, l } = sameIo(dir, img, name, [['write -P 0x22 0 4k'], ['write -P 0x22 1M 4k'], ['read -P 0x11 64k 4k']]);
    const qb = readFileSync(q);
    const lb = readFileSync(l);
    // the corrupt bit is in the header for both
    assert.equal(lb[CORRUPT_BIT_BYTE]! & 2, 2, `${name}: corrupt bit written`);
    assert.equal(qb[CORRUPT_BIT_BYTE], lb[CORRUPT_BIT_BYTE], `${name}: same incompatible features`);
    // none of the metadata lockstep protects was changed: header (but the bit), refcount
    // table, refcount block, L1 table
    const orig = readFileSync(img);
    const meta = (b: Buffer): Buffer => Buffer.concat([b.subarray(0, CORRUPT_BIT_BYTE), b.subarray(CORRUPT_BIT_BYTE + 1, 0x40000)]);
    assert.ok(meta(lb).equals(meta(orig)), `${name}: metadata untouched`);
    const li = lockstep(['img', 'info', '--output=json', l]);
    assert.equal(li.status, 0, li.stderr);
    assert.equal((JSON.parse(li.stdout) as { 'format-specific': { data: { corrupt: boolean } } })['format-specific'].data.corrupt, true);
  }
});

test('snapshot table and L1 limits are refused at open with QEMU messages; check answers at once', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const base = baseImage(dir);
  const cases: Array<[string, number, number]> = [
    ['snapshots-ffffffff', 60, 0xffffffff],
    ['snapshots-70000', 60, 70000],
    ['snapshots-100-at-header', 60, 100],
    ['l1-16m-entries', 36, 0x1000000],
    ['l1-4m-plus-1', 36, 0x400001],
  ];
  for (const [name, at, value] of cases) {
    const img = join(dir, `${name}.qcow2`);
    copyFileSync(base, img);
    patch(img, at, u32(value));
    const before = readFileSync(img);
    sameIo(dir, img, name, [['write -P 0x22 0 4k']]);
    const qc = run('qemu-img', ['check', img], { allowFail: true });
    const lc = lockstep(['img', 'check', img]);
    assert.equal(lc.stderr.replace(/^lockstep img: /gm, 'qemu-img: '), qc.stderr, `${name}: check stderr`);
    assert.equal(lc.stdout, qc.stdout, `${name}: check stdout`);
    assert.equal(lc.status, qc.status, `${name}: check exit`);
    assert.ok(readFileSync(img).equals(before), `${name}: never written`);
  }
});

test('a backing loop is answered at once', async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const a = join(dir, 'a.qcow2');
  const b = join(dir, 'b.qcow2');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', 'b.qcow2', '-u', a, '1M']);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', 'a.qcow2', '-u', b, '1M']);
  const q = run('qemu-img', ['info', '--backing-chain', a], { allowFail: true });
  // QEMU names the path the loop comes back to
  assert.equal(q.stderr, `qemu-img: Backing file '${a}' creates an infinite loop.\n`);
  for (const args of [['img', 'info', a], ['img', 'info', '--backing-chain', a], ['img', 'check', a], ['img', 'convert', '-O', 'raw', a, join(dir, 'x.raw')]]) {
    const l = lockstep(args);
    assert.equal(l.status, 1, JSON.stringify(args));
    assert.equal(l.stderr, `lockstep img: Could not open '${a}': Backing file '${a}' creates an infinite loop.\n`, JSON.stringify(args));
  }
  const io = lockstep(['io', '-c', 'read 0 512', a]);
  assert.equal(io.stderr, `lockstep io: can't open device ${a}: Backing file '${a}' creates an infinite loop.\n`);
});

test('backing files that are not regular files or block devices are refused as QEMU refuses them; check fails on a missing one', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  mkdirSync(join(dir, 'a-directory'));
  const deep = join(dir, 'deep-missing.qcow2');
  const backings: Array<[string, string]> = [
    ['proc-mem', '/proc/self/mem'],
    ['proc-status', '/proc/self/status'],
    ['directory', join(dir, 'a-directory')],
    ['missing', join(dir, 'missing.raw')],
  ];
  const images: string[] = [];
  for (const [name, backing] of backings) {
    const img = join(dir, `${name}.qcow2`);
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'raw', '-b', backing, '-u', img, '1M']);
    images.push(img);
  }
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', join(dir, 'missing.qcow2'), '-u', join(dir, 'mid.qcow2'), '1M']);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', join(dir, 'mid.qcow2'), '-u', deep, '1M']);
  images.push(deep);
  for (const img of images) {
    const qc = run('qemu-img', ['check', img], { allowFail: true });
    const lc = lockstep(['img', 'check', img]);
    assert.equal(lc.stderr.replace(/^lockstep img: /gm, 'qemu-img: '), qc.stderr, `check stderr of ${img}`);
    assert.equal(lc.stdout, qc.stdout);
    assert.equal(lc.status, qc.status, `check exit of ${img}`);
    const qi = run('qemu-io', ['-c', 'read 0 512', img], { allowFail: true });
    const li = lockstep(['io', '-c', 'read 0 512', img]);
    assert.equal(li.stderr.replace(/^lockstep io: /gm, 'qemu-io: '), qi.stderr, `io stderr of ${img}`);
    assert.equal(li.status, qi.status);
  }
});
