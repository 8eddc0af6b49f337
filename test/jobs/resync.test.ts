// x-blockdev-resync against `./bin/lockstep daemon`: exactly the listed ranges are copied
// (every byte outside them stays as it was), zero runs become zeroes or, onto a target known
// to be zero, are not written at all (nothing allocated in a qcow2 target), the speed limit
// holds (bytes done never exceed speed x elapsed plus one slice), cancel reports a resume
// point, and resuming from it gives the bytes of an uninterrupted run. Bad input is refused.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync, truncateSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from '../helpers/graph.js';
import { rejectsWithDesc, startDaemon } from '../helpers/daemon.js';
import { haveTool, rng, run } from '../helpers/jobs.js';
import type { QmpClient } from '../../src/qmp/client.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 8 * MiB;

interface Extent {
  offset: number;
  length: number;
}

function rawNode(name: string, file: string): string[] {
  return ['--blockdev', `driver=raw,node-name=${name},file.driver=file,file.filename=${file}`];
}

/** What the target must hold: `before` with the extents taken from `source`. */
function expectedAfter(before: Buffer, source: Buffer, extents: Extent[]): Buffer {
  const e = Buffer.from(before);
  for (const x of extents) source.copy(e, x.offset, x.offset, x.offset + x.length);
  return e;
}

async function finished(c: QmpClient, id: string): Promise<Record<string, unknown>> {
  const ev = await c.waitEvent('BLOCK_JOB_COMPLETED', (d) => d.device === id, 60_000);
  return ev.data!;
}

interface Info {
  device: string;
  len: number;
  offset: number;
  speed: number;
  'x-done-up-to': number;
  'x-flushed-up-to': number;
}

async function jobInfo(c: QmpClient, id: string): Promise<Info | undefined> {
  const jobs = (await c.execute('query-block-jobs')) as Info[];
  return jobs.find((j) => j.device === id);
}

const rejects = rejectsWithDesc;

test('x-blockdev-resync', async (t) => {
  const dir = tempDir(t);
  const srcPath = join(dir, 'src.raw');
  const src = Buffer.alloc(SIZE);
  {
    const r = rng(4242);
    for (let i = 0; i < SIZE; i += 4) src.writeUInt32LE(r(2 ** 32), i);
    src.fill(0, 2 * MiB, 3 * MiB); // zeroes stored as data
    src.fill(0, 5 * MiB, 6 * MiB); // a hole in the file
    writeFileSync(srcPath, src.subarray(0, 5 * MiB));
    truncateSync(srcPath, 6 * MiB);
    writeFileSync(srcPath, src.subarray(6 * MiB), { flag: 'a' });
    assert.ok(readFileSync(srcPath).equals(src));
  }
  const old = Buffer.alloc(SIZE, 0x77);
  const targets = ['t1', 't2', 't3', 't4', 't5', 't6', 't7'];
  for (const n of [...targets, 'ro']) writeFileSync(join(dir, `${n}.raw`), old);
  const qcowPath = join(dir, 'fresh.qcow2');
  const haveQemuImg = haveTool(t, 'qemu-img');
  if (haveQemuImg) run('qemu-img', ['create', '-q', '-f', 'qcow2', qcowPath, String(SIZE)]);
  const d = await startDaemon(t, dir, [
    ...rawNode('src', srcPath),
    ...targets.flatMap((n) => rawNode(n, join(dir, `${n}.raw`))),
    '--blockdev', `driver=raw,node-name=ro,read-only=on,file.driver=file,file.filename=${join(dir, 'ro.raw')},file.read-only=on`,
    '--blockdev', `driver=null-co,node-name=small,size=${SIZE / 2}`,
  ]);
  const c = await d.client();

  await t.test('copies exactly the listed ranges; zero runs become zeroes', async () => {
    const extents: Extent[] = [
      { offset: SIZE - 64 * KiB, length: 64 * KiB }, // given out of order: copied in ascending order anyway
      { offset: 0, length: 64 * KiB },
      { offset: MiB + 512, length: 3584 },
      { offset: 2 * MiB + 4096, length: MiB }, // half zero data, half random
      { offset: 5 * MiB - 512, length: MiB + 1024 }, // across the hole
    ];
    await c.execute('x-blockdev-resync', { 'job-id': 'r1', device: 'src', target: 't1', extents });
    const total = extents.reduce((a, x) => a + x.length, 0);
    const done = await finished(c, 'r1');
    assert.equal(done.type, 'resync');
    assert.equal(done.len, total);
    assert.equal(done.offset, total);
    assert.equal(done['x-done-up-to'], SIZE);
    // zeroes: [2M+4K, 3M) and [5M, 6M) were written as write-zeroes, the rest as data
    assert.equal(done['x-zeroed-bytes'], MiB - 4096 + MiB);
    assert.equal(done['x-data-bytes'], total - (MiB - 4096 + MiB));
    assert.ok(readFileSync(join(dir, 't1.raw')).equals(expectedAfter(old, src, extents)));
  });

  await t.test('target-is-zero: zero runs are not written at all', async () => {
    // t2 is not zero (the caller says it is): zero runs keep the old bytes, which shows they were skipped
    const extents: Extent[] = [{ offset: 0, length: SIZE }];
    await c.execute('x-blockdev-resync', { 'job-id': 'r2', device: 'src', target: 't2', extents, 'target-is-zero': true });
    const done = await finished(c, 'r2');
    assert.equal(done['x-skipped-zero-bytes'], 2 * MiB);
    assert.equal(done['x-zeroed-bytes'], 0);
    const expected = Buffer.from(src);
    expected.fill(0x77, 2 * MiB, 3 * MiB).fill(0x77, 5 * MiB, 6 * MiB);
    assert.ok(readFileSync(join(dir, 't2.raw')).equals(expected));
  });

  await t.test('target-is-zero onto a new qcow2: nothing is allocated for the zero runs', async (tt) => {
    if (!haveQemuImg) return tt.skip('qemu-img is not installed');
    await c.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'q', file: { driver: 'file', filename: qcowPath } });
    await c.execute('x-blockdev-resync', { 'job-id': 'r3', device: 'src', target: 'q', extents: [{ offset: 0, length: SIZE }], 'target-is-zero': true });
    await finished(c, 'r3');
    await c.execute('blockdev-del', { 'node-name': 'q' });
    const map = JSON.parse(run('qemu-img', ['map', '--output=json', '-f', 'qcow2', qcowPath])) as Array<{ start: number; length: number; data: boolean; zero: boolean }>;
    const allocated: number[][] = [];
    for (const m of map.filter((x) => x.data)) {
      const last = allocated[allocated.length - 1];
      if (last && last[1] === m.start) last[1] = m.start + m.length;
      else allocated.push([m.start, m.start + m.length]);
    }
    assert.deepEqual(allocated, [
      [0, 2 * MiB],
      [3 * MiB, 5 * MiB],
      [6 * MiB, SIZE],
    ]);
    run('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'qcow2', srcPath, qcowPath]);
  });

  await t.test('the speed limit holds, block-job-set-speed changes it', async () => {
    // 32 ranges of 64 KiB: each is one copy, accounted before it starts
    const extents: Extent[] = Array.from({ length: 32 }, (_, i) => ({ offset: i * 256 * KiB, length: 64 * KiB }));
    const speed = 512 * KiB;
    const started = performance.now();
    await c.execute('x-blockdev-resync', { 'job-id': 'r4', device: 'src', target: 't3', extents, speed });
    for (let i = 0; i < 4; i++) {
      await new Promise((r) => setTimeout(r, 200));
      const info = await jobInfo(c, 'r4');
      const elapsed = (performance.now() - started) / 1000;
      assert.ok(info, 'the job still runs: 2 MiB at 512 KiB/s takes 3.9 s at least');
      assert.equal(info.speed, speed);
      // one copy goes at once, then each waits for its share: done <= speed x elapsed + 64 KiB + one 100 ms slice
      assert.ok(info.offset <= speed * elapsed + 64 * KiB + speed / 10, `${info.offset} bytes done after ${elapsed} s at ${speed} B/s`);
      assert.equal(info.len, 32 * 64 * KiB);
    }
    await c.execute('block-job-set-speed', { device: 'r4', speed: 0 });
    const done = await finished(c, 'r4');
    assert.equal(done.speed, 0);
    assert.equal(done.offset, 32 * 64 * KiB);
    assert.ok(readFileSync(join(dir, 't3.raw')).equals(expectedAfter(old, src, extents)));
  });

  await t.test('cancel reports a resume point; resuming from it gives the same bytes', async () => {
    const r = rng(99);
    const extents: Extent[] = [];
    for (let off = 0; off < SIZE; ) {
      const len = (1 + r(64)) * 4096;
      if (off + len > SIZE) break;
      if (r(2) === 0) extents.push({ offset: off, length: len });
      off += len + (1 + r(16)) * 512;
    }
    const total = extents.reduce((a, x) => a + x.length, 0);
    await c.execute('x-blockdev-resync', { 'job-id': 'r5', device: 'src', target: 't4', extents, speed: 2 * MiB, 'auto-dismiss': false });
    let info = await jobInfo(c, 'r5');
    while (info && (info.offset === 0 || info.offset === info.len)) {
      await new Promise((res) => setTimeout(res, 50));
      info = await jobInfo(c, 'r5');
    }
    assert.ok(info && info.offset > 0 && info.offset < total, 'the job was caught mid-way');
    await c.execute('block-job-cancel', { device: 'r5' });
    const ev = await c.waitEvent('BLOCK_JOB_CANCELLED', (x) => x.device === 'r5');
    const upTo = ev.data!['x-done-up-to'] as number;
    const final = await jobInfo(c, 'r5');
    assert.equal(final!['x-done-up-to'], upTo);
    await c.execute('job-dismiss', { id: 'r5' });
    assert.ok(upTo > extents[0]!.offset && upTo < SIZE, `resume point ${upTo}`);
    // below the resume point every listed byte is copied
    const mid = readFileSync(join(dir, 't4.raw'));
    const below = extents.filter((x) => x.offset < upTo).map((x) => ({ offset: x.offset, length: Math.min(x.length, upTo - x.offset) }));
    assert.ok(mid.subarray(0, upTo).equals(expectedAfter(old, src, below).subarray(0, upTo)));
    // resume with what is left
    const rest = extents
      .filter((x) => x.offset + x.length > upTo)
      .map((x) => (x.offset >= upTo ? x : { offset: upTo, length: x.offset + x.length - upTo }));
    await c.execute('x-blockdev-resync', { 'job-id': 'r6', device: 'src', target: 't4', extents: rest });
    await finished(c, 'r6');
    assert.ok(readFileSync(join(dir, 't4.raw')).equals(expectedAfter(old, src, extents)));
  });

  await t.test('flush-bytes: the target is flushed behind the copy; the flushed mark never passes the done mark', async () => {
    // 32 ranges of 64 KiB at 1 MiB/s (about 2 s), a flush after every 256 KiB copied
    const extents: Extent[] = Array.from({ length: 32 }, (_, i) => ({ offset: MiB / 2 + i * 128 * KiB, length: 64 * KiB }));
    const first = extents[0]!.offset;
    const end = extents[31]!.offset + 64 * KiB;
    await c.execute('x-blockdev-resync', { 'job-id': 'r7', device: 'src', target: 't6', extents, speed: MiB, 'flush-bytes': 256 * KiB });
    const seen: number[] = [];
    for (let info = await jobInfo(c, 'r7'); info; info = await jobInfo(c, 'r7')) {
      const flushed = info['x-flushed-up-to'];
      assert.ok(flushed >= first && flushed <= info['x-done-up-to'], `flushed ${flushed}, done ${info['x-done-up-to']}`);
      if (seen[seen.length - 1] !== flushed) seen.push(flushed);
      await new Promise((r) => setTimeout(r, 50));
    }
    const done = await finished(c, 'r7');
    assert.equal(done['x-flushed-up-to'], end);
    // ascending, and flushed mid-way (not only at the end)
    assert.deepEqual([...seen].sort((a, b) => a - b), seen);
    assert.ok(seen.some((f) => f > first && f < end), `flushed marks seen: ${JSON.stringify(seen)}`);
    assert.ok(readFileSync(join(dir, 't6.raw')).equals(expectedAfter(old, src, extents)));
  });

  await t.test('flush-bytes: a target whose flushes fail fails the job, its flushed mark never advanced', async () => {
    await c.execute('blockdev-add', {
      driver: 'blkdebug',
      'node-name': 'noflush',
      image: { driver: 'raw', file: { driver: 'file', filename: join(dir, 't7.raw') } },
      'inject-error': [{ event: 'none', iotype: 'flush', errno: 5 }],
    });
    const extents: Extent[] = [{ offset: 0, length: 2 * MiB }];
    await c.execute('x-blockdev-resync', { 'job-id': 'r8', device: 'src', target: 'noflush', extents, 'flush-bytes': 256 * KiB });
    const done = await finished(c, 'r8');
    assert.match(String(done.error), /Input\/output error|EIO/);
    assert.equal(done['x-flushed-up-to'], 0);
    await c.execute('blockdev-del', { 'node-name': 'noflush' });
    await rejects(c.execute('x-blockdev-resync', { 'job-id': 'x', device: 'src', target: 't5', extents, 'flush-bytes': -1 }), /^Parameter 'flush-bytes' expects a non-negative integer, not -1$/);
  });

  await t.test('bad input gets a clear error and starts nothing', async () => {
    const one = [{ offset: 0, length: 4096 }];
    await rejects(c.execute('x-blockdev-resync', { 'job-id': 'x', device: 'nope', target: 't5', extents: one }), /^Cannot find device='nope' nor node-name='nope'$/);
    await rejects(c.execute('x-blockdev-resync', { 'job-id': 'x', device: 'src', target: 'src', extents: one }), /^Source and target cannot be the same$/);
    await rejects(c.execute('x-blockdev-resync', { 'job-id': 'x', device: 'src', target: 'ro', extents: one }), /^Node 'ro' is read-only$/);
    await rejects(c.execute('x-blockdev-resync', { 'job-id': 'x', device: 'src', target: 'small', extents: one }), /different sizes \(8388608 and 4194304 bytes\)/);
    await rejects(
      c.execute('x-blockdev-resync', { 'job-id': 'x', device: 'src', target: 't5', extents: [{ offset: 100, length: 512 }] }),
      /^extents\[0\] \(offset 100, length 512\) is not aligned to 512 bytes/,
    );
    await rejects(
      c.execute('x-blockdev-resync', { 'job-id': 'x', device: 'src', target: 't5', extents: [one[0]!, { offset: SIZE - 512, length: 1024 }] }),
      /^extents\[1\] \(offset 8388096, length 1024\) ends past the end of the disk \(8388608 bytes\)$/,
    );
    await rejects(
      c.execute('x-blockdev-resync', { 'job-id': 'x', device: 'src', target: 't5', extents: [{ offset: 0, length: 0 }] }),
      /^extents\[0\] \(offset 0, length 0\): offset must be non-negative and length positive$/,
    );
    await rejects(c.execute('x-blockdev-resync', { 'job-id': 'x', device: 'src', target: 't5', extents: one, speed: -1 }), /^Parameter 'speed' expects a non-negative value$/);
    await rejects(c.execute('x-blockdev-resync', { 'job-id': '1x', device: 'src', target: 't5', extents: one }), /^Invalid job ID '1x'$/);
    await rejects(c.execute('x-blockdev-resync', { device: 'src', target: 't5', extents: one }), /^Parameter 'job-id' is missing$/);
    assert.deepEqual(await c.execute('query-block-jobs'), []);
    assert.ok(readFileSync(join(dir, 't5.raw')).equals(old));
  });
});
