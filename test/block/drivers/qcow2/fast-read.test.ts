// qcow2 reads the cached mapping answers (issue 18): no mutex, the same bytes as qemu-io
// wrote, the locked path for everything else, and the same corruption checks.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from '../../../helpers/graph.js';
import { FsHostFile } from '../../../../src/block/drivers/qcow2/host-file.js';
import { readHeader } from '../../../../src/block/drivers/qcow2/header.js';
import { Qcow2Image } from '../../../../src/block/drivers/qcow2/image.js';
import { readRangeInto } from '../../../../src/block/drivers/qcow2/io.js';
import { BlockError } from '../../../../src/errors.js';
import { needTools, run } from './tools.js';

const KiB = 1024;

async function open(path: string): Promise<{ img: Qcow2Image; file: FsHostFile; locks: () => number }> {
  const file = await FsHostFile.open(path, false);
  const img = new Qcow2Image(file, await readHeader(file), { readOnly: true });
  await img.load();
  let n = 0;
  const lock = img.mutex.lock.bind(img.mutex);
  const tryLock = img.mutex.tryLock.bind(img.mutex);
  img.mutex.lock = () => (n++, lock());
  img.mutex.tryLock = () => (n++, tryLock());
  return { img, file, locks: () => n };
}

async function readAt(img: Qcow2Image, offset: number, length: number): Promise<Buffer> {
  const b = Buffer.alloc(length, 0xee);
  await readRangeInto(img, offset, b);
  return b;
}

test('qcow2: a read of mapped clusters in a cached table takes no lock and gives the bytes qemu-io wrote', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const path = join(dir, 'a.qcow2');
  const data = randomBytes(256 * KiB);
  const src = join(dir, 'data.raw');
  writeFileSync(src, Buffer.concat([data, Buffer.alloc(16 * 1024 * KiB - data.length)]));
  // 0-256K data; 1M-1M+64K written after 512K-576K, so that guest-contiguous clusters are
  // not host-contiguous there
  run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', src, path]);
  run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x44 1M 64k', '-c', 'write -P 0x55 960k 64k', path]);
  const { img, file, locks } = await open(path);
  try {
    // the first read loads the table under the lock
    assert.ok((await readAt(img, 0, 64 * KiB)).equals(data.subarray(0, 64 * KiB)));
    const before = locks();
    assert.ok((await readAt(img, 64 * KiB, 64 * KiB)).equals(data.subarray(64 * KiB, 128 * KiB)));
    assert.ok((await readAt(img, 100 * KiB, 150 * KiB)).equals(data.subarray(100 * KiB, 250 * KiB)), 'across clusters');
    assert.ok((await readAt(img, 1024 * KiB + 5, 1000)).equals(Buffer.alloc(1000, 0x44)));
    assert.equal(locks(), before, 'no lock for mapped, cached, contiguous clusters');
    // not contiguous on the host, partly unallocated: the locked path, the same bytes
    const mixed = await readAt(img, 960 * KiB, 128 * KiB);
    assert.ok(mixed.equals(Buffer.concat([Buffer.alloc(64 * KiB, 0x55), Buffer.alloc(64 * KiB, 0x44)])));
    assert.ok((await readAt(img, 200 * KiB, 128 * KiB)).equals(Buffer.concat([data.subarray(200 * KiB), Buffer.alloc(72 * KiB)])));
    assert.ok(locks() > before, 'the locked path for the rest');
    // an L2 entry pointing into metadata fails the fast path as it fails the locked one
    const table = img.l2Cache.peek(img.l1[0]!)!;
    // guest cluster 1 -> the L1 table
    table.writeUInt32BE(0x80000000, 8);
    table.writeUInt32BE(img.header.l1TableOffset % 0x100000000, 12);
    const n = locks();
    await assert.rejects(readAt(img, 64 * KiB, 4 * KiB), (e: unknown) => e instanceof BlockError && e.code === 'EIO' && /metadata/.test(e.message));
    assert.equal(locks(), n, 'refused by the fast path itself');
  } finally {
    await file.close();
  }
});
