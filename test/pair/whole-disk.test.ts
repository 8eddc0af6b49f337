// Issue 14 item 1 at its largest: a pair of 8 GiB disks, a client with extended headers, and
// ONE discard of the whole disk, then ONE write-zeroes of the whole disk (each longer than
// 4 GiB, which a compact request header cannot carry). The pair must stay protected with both
// daemons answering, both disks must read zeroes exactly where data was, qemu-img check must
// find the images clean, and a failover afterwards must serve exactly the last checkpoint.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { promisify } from 'node:util';
import { join } from 'node:path';
import { PairSupervisor } from '../../src/pair/supervisor.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import { tempDir } from '../helpers/graph.js';

const run = promisify(execFile);
const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const SIZE = 8 * GiB;

function pair(dir: string, log: string[]): PairSupervisor {
  return new PairSupervisor({
    dataDir: dir,
    size: SIZE,
    checkpointIntervalMs: 0,
    heartbeatIntervalMs: 50,
    // the defaults' lateness bound; a late answer is logged and counted, the long bound
    // (5 s, the default) decides loss: what is asserted below is that neither side is lost
    heartbeatTimeoutMs: 500,
    failover: 'auto',
    nbdSocket: join(dir, 'disk.sock'),
    log: (level, msg) => log.push(`${level}: ${msg}`),
  });
}

const connect = (dir: string) => NbdClient.connect({ address: { type: 'unix', path: join(dir, 'disk.sock') }, exportName: 'disk', extendedHeaders: true });

/** Where the data goes: both ends of the disk, across the 4 GiB boundary, and in between. */
const PLACES = [0, 3 * MiB + 4096, GiB - 64 * 1024, 4 * GiB - 128 * 1024, 5 * GiB + 12345 * 4096, SIZE - 256 * 1024];
/** Places never written (read back as zeroes before and after). */
const OTHERS = [64 * MiB, 2 * GiB + 7 * MiB, 4 * GiB + MiB, 6 * GiB, SIZE - 4 * MiB];
const LEN = 256 * 1024;

function pattern(i: number, tag: number): Buffer {
  const b = Buffer.alloc(LEN);
  for (let o = 0; o < LEN; o += 4) b.writeUInt32LE(((i + 1) * 0x9e3779b1 + o * 31 + tag) >>> 0, o);
  return b;
}

async function readPlaces(c: NbdClient, offsets: number[]): Promise<Buffer[]> {
  return Promise.all(offsets.map((o) => c.read(o, LEN)));
}

/** Polls until the primary answers a heartbeat after `since` (ms since the epoch). */
async function primaryAnsweredSince(sup: PairSupervisor, since: number): Promise<void> {
  for (;;) {
    const age = sup.status()['heartbeat-age-ms'];
    if (age !== null && Date.now() - age > since) return;
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** After a checkpoint the secondary's overlays are empty, so its disk file alone is its view:
 *  the two disk files compared whole (allocation-aware: 8 GiB of holes is cheap). The flush
 *  first: the daemons keep qcow2 metadata in a cache until one (a discard's cleared L2 entries
 *  were not in the files before it), and both images are read from the files. */
async function sameDisks(c: NbdClient, dir: string, when: string): Promise<void> {
  await c.flush();
  // -U: the daemons have the images open; nothing writes to them now
  const { stdout } = await run('qemu-img', ['compare', '-U', '-f', 'qcow2', '-F', 'qcow2', join(dir, 'primary.qcow2'), join(dir, 'secondary.qcow2')]).catch((e: { stdout?: string }) => {
    throw new Error(`${when}: the disks differ: ${e.stdout ?? String(e)}`);
  });
  assert.match(stdout, /Images are identical/, when);
}

const CLUSTER = 64 * 1024;
/** The clusters the data places touch, as [start, end) ranges. */
const cover = (places: number[]) => places.map((o) => [Math.floor(o / CLUSTER) * CLUSTER, Math.ceil((o + LEN) / CLUSTER) * CLUSTER] as const);

/** Whole-disk zeroing must not allocate the disk: every allocated extent of `file` lies in
 *  the clusters the data places touch (a request over never-written space leaves it unallocated). */
async function allocatedOnlyAt(file: string, places: number[]): Promise<void> {
  const { stdout } = await run('qemu-img', ['map', '-U', '--output=json', file]);
  const extents = JSON.parse(stdout) as Array<{ start: number; length: number; present: boolean }>;
  const ranges = cover(places);
  for (const e of extents.filter((x) => x.present)) {
    assert.ok(
      ranges.some(([a, b]) => e.start >= a && e.start + e.length <= b),
      `${file}: [${e.start}, +${e.length}) allocated outside the written places`,
    );
  }
}

async function qemuImgCheck(file: string): Promise<void> {
  // -U: the daemons have the images open; nothing writes to them now
  const { stdout } = await run('qemu-img', ['check', '-U', '--output=json', file]);
  const r = JSON.parse(stdout) as { 'check-errors': number; corruptions?: number; leaks?: number };
  assert.equal(r['check-errors'], 0, `${file}: ${stdout}`);
  assert.equal(r.corruptions ?? 0, 0, `${file}: ${stdout}`);
  assert.equal(r.leaks ?? 0, 0, `${file}: ${stdout}`);
}

test('one whole-disk discard and one whole-disk write-zeroes of 8 GiB (extended headers) keep the pair protected and the disks equal', { timeout: 300_000 }, async (t) => {
  const dir = tempDir(t, 'lockstep-whole-disk-');
  const log: string[] = [];
  const sup = pair(dir, log);
  t.after(() => sup.stop());
  await sup.start();
  assert.equal(sup.stage, 'protected');
  assert.equal(sup.status().sync?.kind, 'none', 'just-created disks need no initial copy');

  const c = await connect(dir);
  t.after(() => c.destroy());
  // a compact header's 32-bit length cannot say 8 GiB: one request needs extended headers
  assert.equal(c.info.extendedHeaders, true);
  assert.equal(c.info.size, SIZE);

  for (const [i, o] of PLACES.entries()) await c.write(o, pattern(i, 1));
  await c.flush();
  await sup.checkpoint();
  for (const [i, got] of (await readPlaces(c, PLACES)).entries()) assert.ok(got.equals(pattern(i, 1)), `place ${i} before the discard`);

  const zero = Buffer.alloc(LEN);
  const written = PLACES.length * LEN;
  const clusters = cover(PLACES).reduce((a, [x, y]) => a + y - x, 0);
  // the secondary's counter, refreshed at each checkpoint
  const copied = () => sup.status()['hidden-copied-bytes'];
  /** One whole-disk request: the pair stays protected, both daemons answer after it, the
   *  secondary saved exactly the old content of the written clusters (not 8 GiB), and the
   *  disk reads zeroes at every place, written or not. */
  const wholeDisk = async (what: string, request: () => Promise<void>) => {
    const before = copied();
    const t0 = Date.now();
    await request();
    assert.equal(sup.stage, 'protected', `${what}: ${log.join('\n')}`);
    assert.deepEqual(log.filter((l) => /missed its heartbeat|exited/.test(l)), [], what);
    await primaryAnsweredSince(sup, t0);
    for (const [i, got] of (await readPlaces(c, [...PLACES, ...OTHERS])).entries()) assert.ok(got.equals(zero), `${what}: place ${i} is not zero`);
    // the secondary answers too: a checkpoint needs it (and refreshes the counters)
    await sup.checkpoint();
    const saved = copied() - before;
    assert.ok(saved >= written && saved <= clusters, `${what}: ${saved} bytes copied into the hidden disk, the data was ${written} bytes in ${clusters} bytes of clusters`);
    await sameDisks(c, dir, what);
    for (const f of ['primary.qcow2', 'secondary.qcow2']) await allocatedOnlyAt(join(dir, f), PLACES);
  };

  await wholeDisk('one discard of the whole disk', () => c.trim(0, SIZE));
  // data again, then one write-zeroes of the whole disk
  for (const [i, o] of PLACES.entries()) await c.write(o, pattern(i, 2));
  await sup.checkpoint();
  await sameDisks(c, dir, 'the data again');
  await wholeDisk('one write-zeroes of the whole disk', () => c.writeZeroes(0, SIZE));

  // the checkpoint the failover must recover: a little data on the zeroed disk
  await c.write(PLACES[3]!, pattern(3, 3));
  await sup.checkpoint();
  const st = sup.status();
  assert.equal(st.stage, 'protected');
  assert.equal(st['checkpoint-failures'], 0);
  await sameDisks(c, dir, 'the last checkpoint');
  const images = readdirSync(dir).filter((n) => n.endsWith('.qcow2'));
  assert.deepEqual(images.sort(), ['active.qcow2', 'hidden.qcow2', 'primary.qcow2', 'secondary.qcow2']);
  for (const f of images) await qemuImgCheck(join(dir, f));

  // after the checkpoint: more writes and another whole-disk discard, none of it checkpointed
  await c.write(PLACES[0]!, pattern(0, 4));
  await c.trim(0, SIZE);
  await c.write(PLACES[5]!, pattern(5, 4));
  c.destroy();

  const failedOver = new Promise((r) => sup.once('failed-over', r));
  sup.crashPrimary();
  await failedOver;
  assert.equal(sup.stage, 'failed-over');
  const s = await connect(dir);
  t.after(() => s.destroy());
  const after = await readPlaces(s, [...PLACES, ...OTHERS]);
  for (const [i, got] of after.entries()) {
    const want = i === 3 ? pattern(3, 3) : zero;
    assert.ok(got.equals(want), `place ${i} after the failover: not the checkpoint's content`);
  }
  await s.disconnect();
  // the failover committed the hidden disk's saved content into the secondary's disk
  await qemuImgCheck(join(dir, 'secondary.qcow2'));
});
