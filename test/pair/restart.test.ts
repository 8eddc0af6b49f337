// A pair restarted after a failover, a lost secondary, or on a data directory without
// generation records: the generations decide before anything is copied, and no byte written
// on the newer side is lost (the 0x11 / 0x22 / 0x33 sequence first).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readFileSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { PairSupervisor, type PairOptions } from '../../src/pair/supervisor.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import { tempDir } from '../helpers/graph.js';
import { startDaemon } from '../helpers/daemon.js';
import { unionExtents, type ByteRange } from '../../src/pair/sync.js';

interface DirtyRecord {
  granularity: number;
  'dirty-bytes': number;
  extents: ByteRange[];
}

/** Whether the ascending, merged `extents` cover [offset, offset + length). */
function covers(extents: ByteRange[], offset: number, length: number): boolean {
  return extents.some((r) => r.offset <= offset && r.offset + r.length >= offset + length);
}

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;

function pair(dir: string, extra: Partial<PairOptions> = {}): PairSupervisor {
  return new PairSupervisor({
    // 256 KiB dirty-log extents: on a disk of a few MiB the pair's 4 MiB would make every
    // record after a crash name most of the disk, and the resync's bounds checked here vacuous
    dirtyExtentBytes: 256 * 1024,
    dataDir: dir,
    size: SIZE,
    checkpointIntervalMs: 0,
    heartbeatIntervalMs: 50,
    // liveness is not what these tests are about: a loaded machine must not fail a side over
    heartbeatTimeoutMs: 3000,
    failover: 'auto',
    nbdSocket: join(dir, 'disk.sock'),
    // these scenarios stay degraded after the secondary's loss (re-protection: reprotect.test.ts)
    reprotect: false,
    log: () => {},
    ...extra,
  });
}

async function withClient<T>(dir: string, fn: (c: NbdClient) => Promise<T>): Promise<T> {
  const c = await NbdClient.connect({ address: { type: 'unix', path: join(dir, 'disk.sock') }, exportName: 'disk' });
  try {
    return await fn(c);
  } finally {
    await c.disconnect();
  }
}

function firstDiff(a: Buffer, b: Buffer): number {
  return a.findIndex((x, i) => x !== b[i]);
}

/** The two disk files hold the same guest bytes (qemu-img compare exits 0). */
function assertDisksIdentical(dir: string): void {
  const out = execFileSync('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', join(dir, 'primary.qcow2'), join(dir, 'secondary.qcow2')], { encoding: 'utf8' });
  assert.match(out, /Images are identical/);
}

async function failedOver(sup: PairSupervisor): Promise<void> {
  const done = new Promise((r) => sup.once('failed-over', r));
  sup.crashPrimary();
  await done;
}

test('restart after failover: 0x11 checkpointed, 0x22 discarded by the failover, 0x33 written on the survivor all read back right', async (t) => {
  const dir = tempDir(t);
  const sup = pair(dir);
  t.after(() => sup.stop());
  await sup.start();
  assert.equal(sup.status().sync?.kind, 'none'); // two just-created disks
  await withClient(dir, (c) => c.write(0, Buffer.alloc(MiB, 0x11)));
  await sup.checkpoint();
  await withClient(dir, (c) => c.write(2 * MiB, Buffer.alloc(MiB, 0x22)));
  await failedOver(sup);
  await withClient(dir, (c) => c.write(4 * MiB, Buffer.alloc(MiB, 0x33)));
  const want = Buffer.alloc(SIZE);
  want.fill(0x11, 0, MiB);
  want.fill(0x33, 4 * MiB, 5 * MiB);
  const afterFailover = await withClient(dir, (c) => c.read(0, SIZE));
  assert.equal(firstDiff(afterFailover, want), -1);
  const survivorGen = sup.status().disks?.secondary;
  assert.equal(survivorGen?.role, 'primary');
  assert.equal(survivorGen?.consistent, true);
  await sup.stop();

  // each disk's dirty log, read by a fresh daemon as it was left on disk
  const reader = await startDaemon(t, tempDir(t), []);
  const rc = await reader.client();
  const readLog = async (name: string) => (await rc.execute('x-dirty-log-read', { filename: join(dir, `${name}.qcow2.dirty`) })) as DirtyRecord;
  const [pLog, sLog] = [await readLog('primary'), await readLog('secondary')];
  // the primary recorded its 0x22 write after the checkpoint
  assert.ok(covers(pLog.extents, 2 * MiB, MiB), JSON.stringify(pLog));
  // the survivor recorded the failover's rollback of 0x22 and its own 0x33
  assert.ok(covers(sLog.extents, 2 * MiB, MiB) && covers(sLog.extents, 4 * MiB, MiB), JSON.stringify(sLog));
  const union = unionExtents(pLog.extents, sLog.extents);
  const unionBytes = union.reduce((a, r) => a + r.length, 0);

  const again = pair(dir);
  t.after(() => again.stop());
  await again.start();
  const st = again.status();
  assert.equal(st.sync?.kind, 'incremental');
  assert.equal(st.sync?.source, 'secondary');
  // the resync copied exactly the union of the two records, not the disk
  const copied = again.lastResync!;
  assert.deepEqual(copied.extents, union);
  assert.equal(copied.dataBytes + copied.zeroedBytes + copied.skippedZeroBytes, unionBytes);
  assert.ok(copied.dataBytes >= MiB, 'the 0x33 MiB was copied as data');
  assert.ok(unionBytes <= 3 * MiB, `union ${unionBytes} bytes: at most the three written MiB of a ${SIZE}-byte disk`);
  assert.equal(st.stage, 'protected');
  const got = await withClient(dir, (c) => c.read(0, SIZE));
  assert.equal(firstDiff(got, want), -1, 'the restarted pair serves the survivor\'s bytes');
  // both disks now carry one generation, the survivor's
  assert.equal(st.disks?.primary?.generation, survivorGen?.generation);
  assert.equal(st.disks?.secondary?.generation, survivorGen?.generation);
  await again.stop();
  assertDisksIdentical(dir);
  // both records were cleared once the disks were equal
  assert.equal((await readLog('primary'))['dirty-bytes'], 0);
  assert.equal((await readLog('secondary'))['dirty-bytes'], 0);
});

test('restart after the secondary was lost: the primary\'s writes made alone are copied to the secondary', async (t) => {
  const dir = tempDir(t);
  const sup = pair(dir);
  t.after(() => sup.stop());
  await sup.start();
  await withClient(dir, (c) => c.write(MiB, Buffer.alloc(MiB, 0x41)));
  await sup.checkpoint();
  const degraded = new Promise((r) => sup.once('degraded', r));
  (sup as unknown as { secondary: { child: { kill(s: string): void } } }).secondary.child.kill('SIGKILL');
  await degraded;
  await withClient(dir, (c) => c.write(3 * MiB, Buffer.alloc(MiB, 0x42)));
  assert.notEqual(sup.status().disks?.primary?.bitmap, null, 'the primary counts its changes from the common generation');
  await sup.stop();

  const again = pair(dir);
  t.after(() => again.stop());
  await again.start();
  assert.equal(again.status().sync?.kind, 'incremental');
  assert.equal(again.status().sync?.source, 'primary');
  const want = Buffer.alloc(SIZE);
  want.fill(0x41, MiB, 2 * MiB);
  want.fill(0x42, 3 * MiB, 4 * MiB);
  assert.equal(firstDiff(await withClient(dir, (c) => c.read(0, SIZE)), want), -1);
  await again.stop();
  assertDisksIdentical(dir);
});

test('disks without generation records are refused untouched; --force-current settles it', async (t) => {
  const dir = tempDir(t);
  const sup = pair(dir);
  t.after(() => sup.stop());
  await sup.start();
  await withClient(dir, (c) => c.write(0, Buffer.alloc(65536, 0x44)));
  await sup.checkpoint();
  await failedOver(sup);
  await withClient(dir, (c) => c.write(65536, Buffer.alloc(65536, 0x45)));
  await sup.stop();
  // a data directory from before generations
  for (const f of ['primary.qcow2.meta.json', 'secondary.qcow2.meta.json']) rmSync(join(dir, f));
  const hash = (f: string) => createHash('sha256').update(readFileSync(join(dir, f))).digest('hex');
  const before = [hash('primary.qcow2'), hash('secondary.qcow2')];

  const refused = pair(dir);
  t.after(() => refused.stop());
  await assert.rejects(refused.start(), (e: Error & { code?: string }) => {
    assert.equal(e.code, 'ENOMETA');
    assert.match(e.message, /no generation metadata on the primary and the secondary disk: lockstep never guesses which disk is newer/);
    assert.match(e.message, /lockstep pair --force-current secondary/);
    return true;
  });
  await refused.stop();
  assert.deepEqual([hash('primary.qcow2'), hash('secondary.qcow2')], before, 'neither disk was touched');

  const forced = pair(dir, { forceCurrent: 'secondary' });
  t.after(() => forced.stop());
  await forced.start();
  assert.equal(forced.status().sync?.kind, 'full');
  const want = Buffer.alloc(SIZE);
  want.fill(0x44, 0, 65536);
  want.fill(0x45, 65536, 131072);
  assert.equal(firstDiff(await withClient(dir, (c) => c.read(0, SIZE)), want), -1);
  await forced.stop();
  assertDisksIdentical(dir);
});

test('two just-created 64 GiB disks are served without copying anything', async (t) => {
  const dir = tempDir(t);
  const sup = pair(dir, { size: 64 * 1024 ** 3 });
  t.after(() => sup.stop());
  await sup.start();
  assert.equal(sup.status().sync?.kind, 'none');
  assert.equal(sup.stage, 'protected');
  await withClient(dir, async (c) => {
    await c.write(64 * 1024 ** 3 - 4096, Buffer.alloc(4096, 0x64));
    assert.ok((await c.read(64 * 1024 ** 3 - 8192, 8192)).equals(Buffer.concat([Buffer.alloc(4096), Buffer.alloc(4096, 0x64)])));
  });
  await sup.stop();
  // nothing was copied: both images hold metadata and the one write, not 64 GiB of zeroes
  for (const f of ['primary.qcow2', 'secondary.qcow2']) assert.ok(statSync(join(dir, f)).size < 64 * MiB, `${f}: ${statSync(join(dir, f)).size} bytes`);
});
