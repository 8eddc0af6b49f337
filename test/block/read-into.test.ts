// readInto, the read path that fills the caller's buffer: it must give exactly the bytes
// read() gives, on every kind of qcow2 cluster (data, zero, compressed, unallocated over a
// backing file and past its end, partly written), on raw and file nodes (past the end of a
// growable file: zeroes), and through nodes whose driver has no readInto of its own. Every
// target buffer starts full of garbage, so a byte readInto forgets to write shows.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { newGraph, tempDir } from '../helpers/graph.js';
import { Backend } from '../../src/block/backend.js';
import type { BlockNode } from '../../src/block/node.js';
import { needTools, run } from './drivers/qcow2/tools.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** read() and readInto() of [offset, +length) on `node`, both compared with `expected`. */
async function sameBytes(node: BlockNode, offset: number, length: number, expected: Buffer, what: string): Promise<void> {
  const viaRead = await node.read(offset, length);
  const into = Buffer.alloc(length, 0xa5);
  await node.readInto(offset, into);
  const want = expected.subarray(offset, offset + length);
  assert.equal(Buffer.compare(viaRead, want), 0, `${what}: read() of [${offset}, +${length})`);
  assert.equal(Buffer.compare(into, want), 0, `${what}: readInto() of [${offset}, +${length})`);
}

test('qcow2: readInto gives the bytes read gives on data, zero, compressed, backing and unallocated clusters', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const base = join(dir, 'base.raw');
  const top = join(dir, 'top.qcow2');
  const flat = join(dir, 'flat.raw');
  // the backing file is shorter than the image: past its end, unallocated clusters read as zeroes
  writeFileSync(base, randomBytes(MiB + 3 * KiB));
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', '-b', base, '-F', 'raw', top, '2M']);
  const io = (cmd: string): void => void run('qemu-io', ['-f', 'qcow2', '-c', cmd, top]);
  io('write -P 0x11 64k 128k'); // two data clusters (contiguous in the file)
  io('write -z 192k 64k'); // a zero cluster over backing data
  io('write -c -P 0x22 256k 64k'); // a compressed cluster
  io('write -P 0x33 330k 4k'); // a partial write: copy-on-write of the backing data around it
  io('write -P 0x44 1600k 64k'); // data past the backing file's end
  io('write -c -P 0x55 1792k 64k');
  run('qemu-img', ['convert', '-O', 'raw', top, flat]);
  const expected = readFileSync(flat);
  assert.equal(expected.length, 2 * MiB);

  const g = newGraph();
  t.after(() => g.closeAll());
  const node = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: top } });
  const ranges: Array<[number, number]> = [
    [0, 2 * MiB], // the whole disk, every kind at once
    [64 * KiB, 128 * KiB], // two data clusters, one file read
    [100 * KiB, 200 * KiB], // data, zero, compressed
    [192 * KiB, 64 * KiB], // the zero cluster alone
    [256 * KiB + 100, 1000], // inside the compressed cluster
    [320 * KiB, 64 * KiB], // the partly written cluster
    [MiB - 5, 16 * KiB], // backing data running out inside an unallocated cluster
    [MiB + 2 * KiB, 256 * KiB], // the backing file's end, then nothing
    [1590 * KiB, 300 * KiB], // unallocated, data, unallocated, compressed
    [2 * MiB - 1, 1],
  ];
  for (const [offset, length] of ranges) await sameBytes(node, offset, length, expected, 'qcow2');
  // a backend reads through the same path
  const be = new Backend(node);
  const into = Buffer.alloc(300 * KiB, 0xa5);
  await be.readInto(1590 * KiB, into);
  assert.equal(Buffer.compare(into, expected.subarray(1590 * KiB, 1890 * KiB)), 0, 'backend readInto');
  be.release();
});

test('file and raw: readInto past the end of a growable file gives zeroes, as read does', async (t) => {
  const dir = tempDir(t);
  const path = join(dir, 'short.raw');
  const data = randomBytes(10_000);
  writeFileSync(path, data);
  const expected = Buffer.concat([data, Buffer.alloc(20_000)]);
  const g = newGraph();
  t.after(() => g.closeAll());
  const raw = await g.open({ driver: 'raw', file: { driver: 'file', filename: path } });
  await sameBytes(raw, 0, 10_000, expected, 'raw');
  await sameBytes(raw, 4096, 5904, expected, 'raw');
  const file = raw.file!;
  await sameBytes(file, 8192, 8192, expected, 'file past EOF');
  await sameBytes(file, 12_000, 4096, expected, 'file wholly past EOF');
});

test('a node whose driver has no readInto (memory, unaligned requests) still fills the whole buffer', async (t) => {
  const g = newGraph();
  t.after(() => g.closeAll());
  const node = await g.open({ driver: 'memory', size: MiB, align: 4096 });
  const expected = Buffer.alloc(MiB);
  const a = randomBytes(5000);
  await node.write(8192, a);
  a.copy(expected, 8192);
  await sameBytes(node, 0, 64 * KiB, expected, 'memory');
  await sameBytes(node, 8191, 5003, expected, 'memory, unaligned');
  await sameBytes(node, 700 * KiB + 1, 7, expected, 'memory, never written');
});
