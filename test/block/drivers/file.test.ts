// The file driver with the native helper: sparse block status, discard and write-zeroes on a
// real filesystem, and image locking against QEMU (qemu-io, qemu-img) and against another
// lockstep process, both ways. These tests need the helper (native/, built by npm ci) and
// QEMU's tools: with CI set, a missing one fails the test instead of skipping it.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { statSync, truncateSync, writeFileSync, openSync, writeSync, closeSync } from 'node:fs';
import { join } from 'node:path';
import { newGraph, pattern, tempDir } from '../../helpers/graph.js';
import { loadNative, nativeUnavailableReason } from '../../../src/util/native.js';
import type { BlockGraph } from '../../../src/block/graph.js';
import { PERM_ALL, storageChildPerms } from '../../../src/block/permissions.js';
import type { BlockNode } from '../../../src/block/node.js';

const KiB = 1024;
const MiB = 1024 * 1024;

function needNative(t: TestContext): boolean {
  if (loadNative()) return true;
  const reason = `native helper unavailable: ${nativeUnavailableReason()}`;
  if (process.env.CI) assert.fail(`${reason} (npm ci builds it; see native/build.mjs)`);
  t.skip(reason);
  return false;
}

function needTools(t: TestContext, ...tools: string[]): boolean {
  for (const tool of tools) {
    const r = spawnSync(tool, ['--version'], { stdio: 'ignore' });
    if (r.status === 0) continue;
    if (process.env.CI) assert.fail(`${tool} is required (CI is set)`);
    t.skip(`${tool} not installed`);
    return false;
  }
  return true;
}

/** Writes `data` at `offset` of a file, creating it sparse with `size` bytes. */
function sparseFile(path: string, size: number, extents: Array<[number, Buffer]>): void {
  writeFileSync(path, '');
  truncateSync(path, size);
  const fd = openSync(path, 'r+');
  try {
    for (const [offset, data] of extents) writeSync(fd, data, 0, data.length, offset);
  } finally {
    closeSync(fd);
  }
}

interface Extent {
  start: number;
  length: number;
  data: boolean;
  zero: boolean;
}

/** The whole node's block status, merged into maximal runs (as qemu-img map prints it). */
async function mapNode(node: BlockNode): Promise<Extent[]> {
  const out: Extent[] = [];
  const size = node.getLength();
  for (let pos = 0; pos < size; ) {
    const s = await node.blockStatus(pos, size - pos);
    const last = out[out.length - 1];
    if (last && last.data === s.data && last.zero === s.zero) last.length += s.length;
    else out.push({ start: pos, length: s.length, data: s.data, zero: s.zero });
    pos += s.length;
  }
  return out;
}

function qemuImgMap(path: string): Extent[] {
  const r = spawnSync('qemu-img', ['map', '-f', 'raw', '--output=json', path], { encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr);
  return (JSON.parse(r.stdout) as Extent[]).map(({ start, length, data, zero }) => ({ start, length, data, zero }));
}

/**
 * A file node used as a format on it uses it (what takes the image locks: a file node nobody
 * uses locks nothing, as in QEMU): a writer takes consistent read, write and resize and
 * shares neither write nor resize; a reader takes consistent read and shares the same.
 */
async function openFile(g: BlockGraph, filename: string, readOnly = false): Promise<BlockNode> {
  const node = await g.open({ driver: 'file', filename, 'read-only': readOnly });
  try {
    g.createBackend(node, { readOnly, perms: storageChildPerms({ perm: 0, shared: PERM_ALL }, !readOnly) });
  } catch (e) {
    g.collect(node);
    await g.settle();
    throw e;
  }
  return node;
}

function lockMessage(kind: 'write' | 'shared write', filename: string): string {
  const what = kind === 'write' ? '"write"' : 'shared "write"';
  return `Failed to get ${what} lock\nIs another process using the image [${filename}]?`;
}

/** A process kept running with an image open; resolves once it has opened it. */
interface Holder {
  child: ChildProcessWithoutNullStreams;
  stop(): Promise<void>;
}

function hold(t: TestContext, cmd: string, args: string[], ready: string): Promise<Holder> {
  const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'] });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const stop = async (): Promise<void> => {
    child.stdin.end();
    const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
    await exited;
    clearTimeout(timer);
  };
  t.after(stop);
  return new Promise((resolve, reject) => {
    let out = '';
    let err = '';
    const onData = (d: Buffer): void => {
      out += d.toString();
      if (out.includes(ready)) {
        child.stdout.off('data', onData);
        child.stdout.resume();
        resolve({ child, stop });
      }
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    child.once('exit', (code) => reject(new Error(`${cmd} exited with ${code} before holding the image: ${out}${err}`)));
    child.once('error', reject);
  });
}

/** qemu-io with an image open, interactive on a pipe until stop(). */
function holdWithQemuIo(t: TestContext, args: string[]): Promise<Holder> {
  return hold(t, 'qemu-io', args, 'qemu-io>');
}

/** Another lockstep process with a file node open until stop(). */
function holdWithLockstep(t: TestContext, filename: string, readOnly: boolean): Promise<Holder> {
  const graphUrl = new URL('../../../src/block/graph.js', import.meta.url).href;
  const registryUrl = new URL('../../../src/block/registry.js', import.meta.url).href;
  const code = `
    const { BlockGraph } = await import(${JSON.stringify(graphUrl)});
    const { createRegistry } = await import(${JSON.stringify(registryUrl)});
    const g = new BlockGraph(createRegistry());
    const limit = setTimeout(() => process.exit(3), 120000);
    try {
      const n = await g.open({ driver: 'file', filename: ${JSON.stringify(filename)}, 'read-only': ${readOnly} });
      // used as a format uses its file: writer 11 = consistent read | write | resize, reader 1,
      // both sharing 5 = consistent read | write unchanged
      g.createBackend(n, { perms: { perm: ${readOnly ? 1 : 11}, shared: 5 } });
    } catch (e) {
      process.stderr.write(e.message);
      process.exit(1);
    }
    process.stdout.write('holding\\n');
    process.stdin.on('end', async () => { await g.closeAll(); clearTimeout(limit); });
    process.stdin.resume();
  `;
  return hold(t, process.execPath, ['--input-type=module', '-e', code], 'holding');
}

function run(cmd: string, args: string[]): { status: number | null; output: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 30_000 });
  return { status: r.status, output: r.stdout + r.stderr };
}

function qcow2Image(dir: string, name = 'disk.qcow2'): string {
  const path = join(dir, name);
  const r = run('qemu-img', ['create', '-q', '-f', 'qcow2', path, '1M']);
  assert.equal(r.status, 0, r.output);
  return path;
}

// ---- sparse files -------------------------------------------------------------------------

test('block status of a sparse raw file reports holes as zero and matches qemu-img map', async (t) => {
  if (!needNative(t) || !needTools(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const path = join(dir, 'sparse.raw');
  sparseFile(path, 4 * MiB, [
    [1 * MiB, pattern(0xa1, 64 * KiB)],
    [3 * MiB, pattern(0xb2, 128 * KiB)],
  ]);
  const g = newGraph();
  t.after(() => g.closeAll());
  const node = await openFile(g, path, true);
  assert.equal(node.caps.blockStatus, true);

  const first = await node.blockStatus(0, 4 * MiB);
  assert.deepEqual(
    { length: first.length, allocated: first.allocated, data: first.data, zero: first.zero, hostOffset: first.hostOffset },
    { length: 1 * MiB, allocated: true, data: false, zero: true, hostOffset: 0 },
  );
  const data = await node.blockStatus(1 * MiB, 3 * MiB);
  assert.deepEqual([data.length, data.data, data.zero], [64 * KiB, true, false]);
  // a query shorter than the run is cut at its end
  assert.equal((await node.blockStatus(1 * MiB + 4 * KiB, 8 * KiB)).length, 8 * KiB);
  // the trailing hole after the last data runs to the end of the file
  const tail = await node.blockStatus(3 * MiB + 128 * KiB, 1 * MiB - 128 * KiB);
  assert.deepEqual([tail.length, tail.data, tail.zero], [1 * MiB - 128 * KiB, false, true]);

  const ours = await mapNode(node);
  assert.deepEqual(ours, [
    { start: 0, length: 1 * MiB, data: false, zero: true },
    { start: 1 * MiB, length: 64 * KiB, data: true, zero: false },
    { start: 1 * MiB + 64 * KiB, length: 2 * MiB - 64 * KiB, data: false, zero: true },
    { start: 3 * MiB, length: 128 * KiB, data: true, zero: false },
    { start: 3 * MiB + 128 * KiB, length: 1 * MiB - 128 * KiB, data: false, zero: true },
  ]);
  assert.deepEqual(ours, qemuImgMap(path));
  // holes read back as zeroes, data as written
  assert.ok((await node.read(1 * MiB - 4 * KiB, 8 * KiB)).equals(Buffer.concat([Buffer.alloc(4 * KiB), pattern(0xa1, 4 * KiB)])));
});

test('block status through a raw format node passes the holes up', async (t) => {
  if (!needNative(t)) return;
  const dir = tempDir(t);
  const path = join(dir, 'sparse.raw');
  sparseFile(path, 1 * MiB, [[256 * KiB, pattern(7, 4 * KiB)]]);
  const g = newGraph();
  t.after(() => g.closeAll());
  const raw = await g.open({ driver: 'raw', file: { driver: 'file', filename: path } });
  const s = await raw.blockStatus(0, 1 * MiB);
  assert.deepEqual([s.length, s.data, s.zero], [256 * KiB, false, true]);
  const d = await raw.blockStatus(256 * KiB, 768 * KiB);
  assert.deepEqual([d.length, d.data, d.zero], [4 * KiB, true, false]);
});

test('discard punches a hole: the range reads as zeroes, frees its blocks and maps as a hole', async (t) => {
  if (!needNative(t)) return;
  const dir = tempDir(t);
  const path = join(dir, 'full.raw');
  writeFileSync(path, pattern(0xaa, 2 * MiB));
  const g = newGraph();
  t.after(() => g.closeAll());
  const node = await openFile(g, path);
  assert.equal(node.caps.discard, true);
  const blocksBefore = statSync(path).blocks;

  await node.discard(512 * KiB, 1 * MiB);
  await node.flush();
  const expected = pattern(0xaa, 2 * MiB).fill(0, 512 * KiB, 1536 * KiB);
  assert.ok((await node.read(0, 2 * MiB)).equals(expected));
  assert.equal(statSync(path).size, 2 * MiB, 'discard keeps the size');
  assert.equal(statSync(path).blocks, blocksBefore - (1 * MiB) / 512);
  assert.deepEqual(await mapNode(node), [
    { start: 0, length: 512 * KiB, data: true, zero: false },
    { start: 512 * KiB, length: 1 * MiB, data: false, zero: true },
    { start: 1536 * KiB, length: 512 * KiB, data: true, zero: false },
  ]);
});

test('write-zeroes unmaps with mayUnmap, keeps the blocks without it, and is byte exact when unaligned', async (t) => {
  if (!needNative(t)) return;
  const dir = tempDir(t);
  const path = join(dir, 'zero.raw');
  writeFileSync(path, pattern(0x5c, 4 * MiB));
  const g = newGraph();
  t.after(() => g.closeAll());
  const node = await openFile(g, path);
  assert.equal(node.caps.writeZeroes, true);
  const expected = pattern(0x5c, 4 * MiB);
  const blocks0 = statSync(path).blocks;

  // with mayUnmap: a hole (blocks freed, mapped as a hole)
  await node.writeZeroes(1 * MiB, 1 * MiB, { mayUnmap: true });
  expected.fill(0, 1 * MiB, 2 * MiB);
  assert.equal(statSync(path).blocks, blocks0 - (1 * MiB) / 512);
  const hole = await node.blockStatus(1 * MiB, 3 * MiB);
  assert.deepEqual([hole.length, hole.data, hole.zero], [1 * MiB, false, true]);

  // without: zeroed in place (ZERO_RANGE, or zero buffers), nothing is deallocated
  await node.writeZeroes(2 * MiB, 1 * MiB, {});
  expected.fill(0, 2 * MiB, 3 * MiB);
  assert.equal(statSync(path).blocks, blocks0 - (1 * MiB) / 512);

  // unaligned ranges zero exactly their bytes, both ways
  await node.writeZeroes(3 * MiB + 1000, 9000, { mayUnmap: true });
  expected.fill(0, 3 * MiB + 1000, 3 * MiB + 10000);
  await node.writeZeroes(3 * MiB + 20001, 4097, {});
  expected.fill(0, 3 * MiB + 20001, 3 * MiB + 24098);
  await node.flush();
  assert.ok((await node.read(0, 4 * MiB)).equals(expected));
  assert.equal(statSync(path).size, 4 * MiB);
});

test('write-zeroes past the end of the file grows it, with or without mayUnmap', async (t) => {
  if (!needNative(t)) return;
  const dir = tempDir(t);
  const path = join(dir, 'grow.raw');
  writeFileSync(path, pattern(0x11, 64 * KiB));
  const g = newGraph();
  t.after(() => g.closeAll());
  const node = await openFile(g, path);

  await node.writeZeroes(32 * KiB, 64 * KiB, { mayUnmap: true });
  assert.equal(node.getLength(), 96 * KiB);
  assert.equal(statSync(path).size, 96 * KiB);
  await node.writeZeroes(96 * KiB, 32 * KiB, {});
  assert.equal(statSync(path).size, 128 * KiB);
  const expected = Buffer.concat([pattern(0x11, 32 * KiB), Buffer.alloc(96 * KiB)]);
  assert.ok((await node.read(0, 128 * KiB)).equals(expected));
});

test('without the helper (LOCKSTEP_NATIVE=off) the file driver works as before and still locks in-process', async (t) => {
  const dir = tempDir(t);
  const path = join(dir, 'plain.raw');
  sparseFile(path, 1 * MiB, [[0, pattern(3, 4 * KiB)]]);
  const src = (rel: string): string => JSON.stringify(new URL(`../../../src/${rel}`, import.meta.url).href);
  const code = `
    const { BlockGraph } = await import(${src('block/graph.js')});
    const { createRegistry } = await import(${src('block/registry.js')});
    const { loadNative } = await import(${src('util/native.js')});
    const g = new BlockGraph(createRegistry());
    const n = await g.open({ driver: 'file', filename: ${JSON.stringify(path)} });
    g.createBackend(n, { perms: { perm: 11, shared: 5 } }); // a writable format's use
    await n.writeZeroes(0, 1024, { mayUnmap: true });
    await n.discard(0, 4096);
    const s = await n.blockStatus(0, 1 << 20);
    const b = await n.read(0, 4096);
    let second = 'opened';
    try {
      const r = await g.open({ driver: 'file', filename: ${JSON.stringify(path)}, 'read-only': true });
      g.createBackend(r, { perms: { perm: 1, shared: 5 } }); // a reading format's use
    } catch (e) { second = e.message; }
    await g.closeAll();
    console.log(JSON.stringify({ native: loadNative() !== null, caps: n.caps, s, zeroes: b.subarray(0, 1024).every((x) => x === 0),
      kept: b.subarray(1024).every((x) => x === 3), second }));
  `;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', code], {
    encoding: 'utf8',
    env: { ...process.env, LOCKSTEP_NATIVE: 'off' },
    timeout: 30_000,
  });
  assert.equal(r.status, 0, r.stderr);
  const out = JSON.parse(r.stdout) as {
    native: boolean;
    caps: { blockStatus: boolean; discard: boolean; writeZeroes: boolean };
    s: { length: number; data: boolean };
    zeroes: boolean;
    kept: boolean;
    second: string;
  };
  assert.equal(out.native, false);
  assert.deepEqual([out.caps.blockStatus, out.caps.discard, out.caps.writeZeroes], [false, false, false]);
  assert.deepEqual([out.s.length, out.s.data], [1 * MiB, true]);
  assert.equal(out.zeroes, true, 'emulated write-zeroes zeroed the range');
  assert.equal(out.kept, true, 'discard without the helper is a no-op');
  assert.equal(out.second, lockMessage('shared write', path));
});

// ---- locking against QEMU -----------------------------------------------------------------

test('a qemu-io writer on a qcow2 image refuses lockstep writers and readers with QEMU\'s messages', async (t) => {
  if (!needNative(t) || !needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const path = qcow2Image(dir);
  const qemu = await holdWithQemuIo(t, ['-f', 'qcow2', path]);
  const g = newGraph();
  t.after(() => g.closeAll());
  await assert.rejects(openFile(g, path), { name: 'InvalidArgumentError', message: lockMessage('write', path) });
  await assert.rejects(openFile(g, path, true), { name: 'InvalidArgumentError', message: lockMessage('shared write', path) });
  // force-share (qemu-img -U) reads anyway
  const shared = await g.open({ driver: 'file', filename: path, 'read-only': true, 'force-share': true });
  assert.equal((await shared.read(0, 4)).toString('latin1'), 'QFI\xfb');
  await qemu.stop();
  const n = await openFile(g, path);
  assert.equal(n.readOnly, false);
});

test('a qemu-io writer on a raw image refuses a lockstep writer (raw shares write, lockstep does not)', async (t) => {
  if (!needNative(t) || !needTools(t, 'qemu-io')) return;
  const dir = tempDir(t);
  const path = join(dir, 'disk.raw');
  sparseFile(path, 1 * MiB, []);
  await holdWithQemuIo(t, ['-f', 'raw', path]);
  const g = newGraph();
  t.after(() => g.closeAll());
  await assert.rejects(openFile(g, path), { message: lockMessage('shared write', path) });
});

test('a lockstep writer refuses qemu-img info and qemu-io, and releases its locks on close', async (t) => {
  if (!needNative(t) || !needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const path = qcow2Image(dir);
  const raw = join(dir, 'disk.raw');
  sparseFile(raw, 1 * MiB, []);
  const g = newGraph();
  t.after(() => g.closeAll());
  const node = await openFile(g, path);
  const rawNode = await openFile(g, raw);

  const info = run('qemu-img', ['info', path]);
  assert.notEqual(info.status, 0);
  assert.match(info.output, /Failed to get shared "write" lock\nIs another process using the image \[.*disk\.qcow2\]\?/);
  const io = run('qemu-io', ['-f', 'qcow2', '-c', 'read 0 512', path]);
  assert.notEqual(io.status, 0);
  assert.match(io.output, /Failed to get "write" lock/);
  const ioRo = run('qemu-io', ['-r', '-f', 'qcow2', '-c', 'read 0 512', path]);
  assert.notEqual(ioRo.status, 0);
  assert.match(ioRo.output, /Failed to get shared "write" lock/);
  const ioRaw = run('qemu-io', ['-f', 'raw', '-c', 'write 0 512', raw]);
  assert.notEqual(ioRaw.status, 0);
  assert.match(ioRaw.output, /Failed to get "write" lock/);
  // -U shares everything, as with QEMU's own writers
  assert.equal(run('qemu-img', ['info', '-U', path]).status, 0);

  await g.closeAll();
  assert.ok(node.closed && rawNode.closed);
  const after = run('qemu-img', ['info', path]);
  assert.equal(after.status, 0, after.output);
  assert.equal(run('qemu-io', ['-f', 'raw', '-c', 'write 0 512', raw]).status, 0);
});

test('read-only lockstep and read-only QEMU opens coexist, in both orders', async (t) => {
  if (!needNative(t) || !needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const path = qcow2Image(dir);
  const g = newGraph();
  t.after(() => g.closeAll());
  const ro = await openFile(g, path, true);
  const io = run('qemu-io', ['-r', '-f', 'qcow2', '-c', 'read 0 512', path]);
  assert.equal(io.status, 0, io.output);
  assert.equal(run('qemu-img', ['info', path]).status, 0);
  // ... but a QEMU writer is refused by the reader
  assert.match(run('qemu-io', ['-f', 'qcow2', '-c', 'read 0 512', path]).output, /Failed to get "write" lock/);
  await g.closeAll();
  assert.ok(ro.closed);

  await holdWithQemuIo(t, ['-r', '-f', 'qcow2', path]);
  const g2 = newGraph();
  t.after(() => g2.closeAll());
  const again = await openFile(g2, path, true);
  assert.equal((await again.read(0, 4)).toString('latin1'), 'QFI\xfb');
  await assert.rejects(openFile(g2, path), { message: lockMessage('write', path) });
});

test('reopen moves the locks: read-write refused while QEMU reads, then taken and given back', async (t) => {
  if (!needNative(t) || !needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const path = qcow2Image(dir);
  const g = newGraph();
  t.after(() => g.closeAll());
  // a qcow2 node: what it takes on its file follows its own writability
  const q = await g.open({ driver: 'qcow2', 'read-only': true, file: { driver: 'file', filename: path } });
  const node = q.file!;
  const reader = await holdWithQemuIo(t, ['-r', '-f', 'qcow2', path]);
  await assert.rejects(q.setReadOnly(false), { message: lockMessage('write', path) });
  assert.equal(q.readOnly, true);
  // the failed reopen kept the read-only locks: a QEMU writer is still refused
  assert.match(run('qemu-io', ['-f', 'qcow2', '-c', 'read 0 512', path]).output, /Failed to get "write" lock/);
  await reader.stop();

  await q.setReadOnly(false);
  await node.write(0, Buffer.from('QFI\xfb', 'latin1'));
  assert.match(run('qemu-img', ['info', path]).output, /Failed to get shared "write" lock/);
  await q.setReadOnly(true);
  const info = run('qemu-img', ['info', path]);
  assert.equal(info.status, 0, info.output);
});

// ---- two lockstep processes ---------------------------------------------------------------

test('two lockstep processes refuse each other, as writers and as a reader against a writer', async (t) => {
  if (!needNative(t)) return;
  const dir = tempDir(t);
  const path = join(dir, 'shared.raw');
  sparseFile(path, 1 * MiB, []);
  const other = await holdWithLockstep(t, path, false);
  const g = newGraph();
  t.after(() => g.closeAll());
  await assert.rejects(openFile(g, path), { name: 'InvalidArgumentError', message: lockMessage('write', path) });
  await assert.rejects(openFile(g, path, true), { message: lockMessage('shared write', path) });
  await other.stop();
  const mine = await openFile(g, path);

  // and the other way round: the child cannot open what this process holds
  await assert.rejects(holdWithLockstep(t, path, false), /Failed to get "write" lock\nIs another process using the image/);
  await assert.rejects(holdWithLockstep(t, path, true), /Failed to get shared "write" lock/);
  await g.closeAll();
  assert.ok(mine.closed);
  const g3 = newGraph();
  t.after(() => g3.closeAll());
  await openFile(g3, path, true);
  const reader = await holdWithLockstep(t, path, true);
  await reader.stop();
});

test('two nodes of one process on the same file exclude each other like two processes', async (t) => {
  const dir = tempDir(t);
  const path = join(dir, 'one.raw');
  sparseFile(path, 64 * KiB, []);
  const g1 = newGraph();
  const g2 = newGraph();
  t.after(() => Promise.all([g1.closeAll(), g2.closeAll()]));
  await openFile(g1, path, true);
  await openFile(g2, path, true);
  await assert.rejects(openFile(g2, path), { message: lockMessage('write', path) });
  await g1.closeAll();
  await assert.rejects(openFile(g2, path), { message: lockMessage('write', path) });
  await g2.closeAll();
  await openFile(g1, path);
  await assert.rejects(g2.open({ driver: 'file', filename: path, 'force-share': true }), {
    message: 'force-share=on can only be used with read-only images',
  });
});
