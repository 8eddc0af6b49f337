// `lockstep pair run --copy-unit 4K`: the secondary's hidden disk is created with 4 KiB
// clusters and its copy-before-write copies 4 KiB units, and the data rule holds as with
// QEMU's 64 KiB: after failover the served disk is exactly the disk at the last checkpoint.
// Writes are unaligned and straddle units, racing checkpoints; the overlays pass qemu-img check.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { PairSupervisor } from '../../src/pair/supervisor.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import { tempDir } from '../helpers/graph.js';
import { rng } from '../helpers/rng.js';

const MiB = 1024 * 1024;
const KiB = 1024;
const SIZE = 16 * MiB;

function clusterSize(path: string): number {
  const info = JSON.parse(execFileSync('qemu-img', ['info', '-U', '--output=json', path], { encoding: 'utf8' })) as { 'cluster-size': number };
  return info['cluster-size'];
}

test('--copy-unit 4K: 4 KiB units into a hidden disk of 4 KiB clusters; the primary killed, the secondary serves exactly the last checkpoint; the same after re-protection with the roles swapped', { timeout: 120_000 }, async (t) => {
  const dir = tempDir(t);
  const sup = new PairSupervisor({
    dataDir: dir,
    size: SIZE,
    checkpointIntervalMs: 0,
    heartbeatIntervalMs: 50,
    heartbeatTimeoutMs: 5000,
    failover: 'auto',
    nbdSocket: join(dir, 'disk.sock'),
    // a failed attempt would be retried at once; the test drives re-protection itself
    reprotectBackoffMs: 600_000,
    copyUnit: 4 * KiB,
    log: () => {},
  });
  t.after(() => sup.stop());
  await sup.start();
  assert.equal(sup.stage, 'protected');
  // the hidden disk takes the unit as its cluster size; the active disk keeps qcow2's default
  assert.equal(clusterSize(join(dir, 'hidden.qcow2')), 4 * KiB);
  assert.equal(clusterSize(join(dir, 'active.qcow2')), 64 * KiB);
  const s = sup.secondary!;
  const nodes = (await sup.call(s, 'query-named-block-nodes', { flat: true })) as Array<{ 'node-name': string; drv: string }>;
  assert.ok(nodes.some((n) => n.drv === 'copy-before-write'), 'the secondary runs copy-before-write');
  const repl = (await sup.call(s, 'query-replication')) as Array<{ 'node-name': string; 'dirty-clusters': number; 'bytes-copied': number }>;
  assert.equal(repl.length, 1);

  const client = await NbdClient.connect({ address: { type: 'unix', path: join(dir, 'disk.sock') }, exportName: 'disk' });
  const rand = rng(18);
  const int = (n: number) => Math.floor(rand() * n);
  // unaligned writes of 1 byte to 20 KiB anywhere, several in flight, racing checkpoints
  const burst = async (n: number, c = client): Promise<void> => {
    const ws: Promise<void>[] = [];
    for (let i = 0; i < n; i++) {
      const len = 1 + int(20 * KiB);
      ws.push(c.write(int(SIZE - len), Buffer.alloc(len, 1 + int(255))));
    }
    await Promise.all(ws);
  };
  for (let round = 0; round < 6; round++) await Promise.all([burst(24), sup.checkpoint()]);
  await burst(8);
  await sup.checkpoint();
  const atCheckpoint = await client.read(0, SIZE);
  // one write inside one unit, one across two: exactly 3 units copied since the checkpoint
  await client.write(5 * MiB + 100, Buffer.alloc(200, 0xa1));
  await client.write(9 * MiB + 4 * KiB - 10, Buffer.alloc(20, 0xa2)); // one 64 KiB cluster, two units
  const after = (await sup.call(s, 'query-replication')) as Array<{ 'dirty-clusters': number }>;
  assert.equal(after[0]!['dirty-clusters'], 3, 'units copied since the last checkpoint (64 KiB units: 2)');
  // more writes not covered by a checkpoint: lost at failover
  await burst(16);
  client.destroy();
  const failedOver = new Promise((r) => sup.once('failed-over', r));
  sup.crashPrimary();
  await failedOver;
  assert.equal(sup.stage, 'failed-over');
  const second = await NbdClient.connect({ address: { type: 'unix', path: join(dir, 'disk.sock') }, exportName: 'disk' });
  t.after(() => second.disconnect().catch(() => {}));
  const got = await second.read(0, SIZE);
  assert.equal(got.findIndex((b, i) => b !== atCheckpoint[i]), -1, 'the recovered disk differs from the last checkpoint');
  // the failover committed the overlays and closed them: both are consistent qcow2 images
  for (const n of ['hidden.qcow2', 'active.qcow2']) execFileSync('qemu-img', ['check', '-q', join(dir, n)]);

  // the old primary's disk returns as the secondary, with overlays of its own names
  const protectedAgain = new Promise((r) => sup.once('protected', r));
  await sup.reprotect();
  await protectedAgain;
  assert.equal(sup.secondary?.name, 'primary');
  assert.equal(clusterSize(join(dir, 'primary-hidden.qcow2')), 4 * KiB);
  for (let round = 0; round < 4; round++) await Promise.all([burst(24, second), sup.checkpoint()]);
  await sup.checkpoint();
  const atCheckpoint2 = await second.read(0, SIZE);
  await burst(16, second);
  second.destroy();
  const failedBack = new Promise((r) => sup.once('failed-over', r));
  sup.crashPrimary();
  await failedBack;
  const third = await NbdClient.connect({ address: { type: 'unix', path: join(dir, 'disk.sock') }, exportName: 'disk' });
  const got2 = await third.read(0, SIZE);
  await third.disconnect();
  assert.equal(got2.findIndex((b, i) => b !== atCheckpoint2[i]), -1, 'after failing back the recovered disk differs from the last checkpoint');
  for (const n of ['primary-hidden.qcow2', 'primary-active.qcow2']) execFileSync('qemu-img', ['check', '-q', join(dir, n)]);
});
