// After a failover the survivor serves its recovered disk under a one-child quorum (as COLO's
// secondary does), so that a replication child can join it later while clients stay
// connected: the first step of re-protection after failover (issue 13 item 4). Here a child
// joins inside a barrier while one client keeps writing over the same NBD connection; every
// write issued after the barrier must land on the new child too, byte for byte, and the
// served disk must hold every write.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { PairSupervisor } from '../../src/pair/supervisor.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import { createQcow2 } from '../../src/block/drivers/qcow2/create.js';
import { tempDir } from '../helpers/graph.js';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;
const CHUNK = 64 * 1024;

test('the survivor serves under a one-child quorum; a child joins it under live writes on the same connection and gets every write issued after the barrier', { timeout: 120_000 }, async (t) => {
  const dir = tempDir(t);
  const sup = new PairSupervisor({
    dataDir: dir,
    size: SIZE,
    checkpointIntervalMs: 0,
    heartbeatIntervalMs: 50,
    heartbeatTimeoutMs: 3000,
    failover: 'auto',
    nbdSocket: join(dir, 'disk.sock'),
    log: () => {},
  });
  t.after(() => sup.stop());
  await sup.start();
  const before = await NbdClient.connect({ address: { type: 'unix', path: join(dir, 'disk.sock') }, exportName: 'disk' });
  await before.write(0, Buffer.alloc(MiB, 0x11));
  await sup.checkpoint();
  await before.disconnect();
  const failedOver = new Promise((r) => sup.once('failed-over', r));
  sup.crashPrimary();
  await failedOver;
  const s = sup.secondary!;

  // the served node is a quorum whose one child is the committed replication node
  const nodes = (await sup.call(s, 'query-named-block-nodes', { flat: true })) as Array<{ 'node-name': string; drv: string }>;
  assert.equal(nodes.find((n) => n['node-name'] === 'colo-disk0')?.drv, 'quorum');
  const exports = (await sup.call(s, 'query-block-exports')) as Array<{ id: string; 'node-name': string }>;
  assert.equal(exports.find((e) => e.id === 'disk')?.['node-name'], 'colo-disk0');

  const client = await NbdClient.connect({ address: { type: 'unix', path: join(dir, 'disk.sock') }, exportName: 'disk' });
  t.after(() => client.disconnect().catch(() => {}));
  // one writer, one request at a time, each 64 KiB chunk of 2..14 MiB once, its own byte
  const issued: Array<{ offset: number; fill: number; issuedAt: number; doneAt: number }> = [];
  let clock = 0;
  let stop = false;
  const writer = (async () => {
    for (let i = 0; !stop && 2 * MiB + (i + 1) * CHUNK <= 14 * MiB; i++) {
      const offset = 2 * MiB + i * CHUNK;
      const fill = 1 + (i % 250);
      const issuedAt = ++clock;
      await client.write(offset, Buffer.alloc(CHUNK, fill));
      issued.push({ offset, fill, issuedAt, doneAt: ++clock });
      await new Promise((r) => setTimeout(r, 2));
    }
  })();
  while (issued.length < 20) await new Promise((r) => setTimeout(r, 10));

  const extra = join(dir, 'extra.qcow2');
  await createQcow2(extra, { size: SIZE });
  await sup.call(s, 'blockdev-add', { driver: 'qcow2', 'node-name': 'extra', file: { driver: 'file', filename: extra } });
  const holdSent = ++clock;
  await sup.call(s, 'block-io-hold', { 'node-name': 'colo-disk0' });
  await sup.call(s, 'x-blockdev-change', { parent: 'colo-disk0', node: 'extra' });
  await sup.call(s, 'block-io-release', { 'node-name': 'colo-disk0' });
  const released = ++clock;
  while (issued.filter((w) => w.issuedAt > released).length < 20) await new Promise((r) => setTimeout(r, 10));
  stop = true;
  await writer;
  await sup.call(s, 'x-blockdev-change', { parent: 'colo-disk0', child: 'children.1' });
  await sup.call(s, 'blockdev-del', { 'node-name': 'extra' });

  // the served disk holds every write; the new child every write issued after the barrier
  // and none completed before it began (those in between may be on it or not)
  const served = await client.read(0, SIZE);
  const want = Buffer.alloc(SIZE);
  want.fill(0x11, 0, MiB);
  for (const w of issued) want.fill(w.fill, w.offset, w.offset + CHUNK);
  assert.equal(served.compare(want), 0, 'the served disk lost a write');
  const raw = join(dir, 'extra.raw');
  execFileSync('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', extra, raw]);
  const child = readFileSync(raw);
  let after = 0;
  for (const w of issued) {
    const got = child.subarray(w.offset, w.offset + CHUNK);
    if (w.issuedAt > released) {
      after++;
      assert.equal(got.compare(Buffer.alloc(CHUNK, w.fill)), 0, `the write at ${w.offset} issued after the barrier is not on the new child`);
    } else if (w.doneAt < holdSent) {
      assert.equal(got.compare(Buffer.alloc(CHUNK)), 0, `the write at ${w.offset} done before the barrier is on the new child`);
    }
  }
  assert.ok(after >= 20);
  assert.equal(child.subarray(0, MiB).compare(Buffer.alloc(MiB)), 0);
});
