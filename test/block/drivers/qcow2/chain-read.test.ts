// Reads through backing chains, where a layer hands its backing file's buffer up with its
// own clusters laid over it (io.ts readRange): every kind of cluster a layer can define over
// a backing file (data, zero, compressed, unallocated) and chains of many layers read back
// byte for byte as qemu-img convert reads them, at every alignment of the request.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { newGraph, tempDir } from '../../../helpers/graph.js';
import { needTools, run } from './tools.js';

async function readWith(path: string, pieces: Array<[number, number]>): Promise<Buffer[]> {
  const g = newGraph();
  const n = await g.open({ driver: 'qcow2', 'read-only': true, file: { driver: 'file', filename: path } });
  try {
    const out: Buffer[] = [];
    for (const [off, len] of pieces) out.push(await n.read(off, len));
    return out;
  } finally {
    await g.closeAll();
  }
}

function qemuRaw(dir: string, path: string): Buffer {
  const out = join(dir, 'qemu.raw');
  run('qemu-img', ['convert', '-O', 'raw', path, out]);
  return readFileSync(out);
}

test('data, zero, compressed and unallocated clusters over a backing file read as QEMU reads them', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const base = join(dir, 'base.qcow2');
  const top = join(dir, 'top.qcow2');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', base, '1M']);
  run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 1M', base]);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', '-F', 'qcow2', '-b', base, top]);
  // one of each kind in the first 64 KiB, most of it left to the backing file
  run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x22 4k 4k', '-c', 'write -z 12k 4k', '-c', 'write -c -P 0x33 20k 4k', '-c', 'write -P 0x44 30k 3k', top]);
  const want = qemuRaw(dir, top);
  const pieces: Array<[number, number]> = [[0, 64 * 1024], [1, 40 * 1024], [4095, 8194], [12 * 1024 + 7, 9000], [0, 1024 * 1024], [20 * 1024, 4096]];
  const got = await readWith(top, pieces);
  pieces.forEach(([off, len], i) => assert.ok(got[i]!.equals(want.subarray(off, off + len)), `read ${off}+${len}`));
});

test('a 40-layer chain, every layer with data in the same 2 MiB, reads as QEMU reads it', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  let prev = join(dir, 'l0.qcow2');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', prev, '8M']);
  run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x01 0 4M', prev]);
  for (let i = 1; i <= 40; i++) {
    const layer = join(dir, `l${i}.qcow2`);
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', prev, layer]);
    const cmds = [`write -P ${i + 1} ${i * 8192} 4k`];
    if (i % 7 === 0) cmds.push(`write -z ${i * 65536} 64k`);
    if (i % 5 === 0) cmds.push(`write -P ${i + 100} ${3 * 1024 * 1024 + i * 65536} 128k`);
    run('qemu-io', ['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), layer]);
    prev = layer;
  }
  const want = qemuRaw(dir, prev);
  const pieces: Array<[number, number]> = [[0, 2 * 1024 * 1024], [2 * 1024 * 1024, 2 * 1024 * 1024], [4096 - 3, 300 * 1024], [0, 8 * 1024 * 1024]];
  const got = await readWith(prev, pieces);
  pieces.forEach(([off, len], i) => assert.ok(got[i]!.equals(want.subarray(off, off + len)), `read ${off}+${len}`));
});
