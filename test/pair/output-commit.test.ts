// Output commit and the lease in `lockstep pair` (issues 16, 17), one host, real daemons: with
// checkpoints on demand only, a flush completes because it starts a checkpoint itself; flushes
// sent together share checkpoints; after the primary is killed the recovered disk is the last
// checkpoint, which holds every acknowledged flush. With flush commit off nothing waits. The
// primary holds a lease the supervisor renews, and failover waits for it to run out.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { PairSupervisor, type PairOptions } from '../../src/pair/supervisor.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import { tempDir } from '../helpers/graph.js';

const MiB = 1024 * 1024;
const SIZE = 8 * MiB;

function pair(dir: string, extra: Partial<PairOptions> = {}, logs: string[] = []): PairSupervisor {
  return new PairSupervisor({
    dataDir: dir,
    size: SIZE,
    checkpointIntervalMs: 0,
    heartbeatIntervalMs: 50,
    heartbeatTimeoutMs: 400,
    failover: 'auto',
    nbdSocket: join(dir, 'disk.sock'),
    log: (_level, msg) => void logs.push(msg),
    ...extra,
  });
}

const connect = (sock: string) => NbdClient.connect({ address: { type: 'unix', path: sock }, exportName: 'disk' });

test('pair: a flush starts its own checkpoint, flushes sent together share them, and the recovered disk holds every acknowledged flush', async (t) => {
  const dir = tempDir(t);
  const logs: string[] = [];
  const sup = pair(dir, {}, logs);
  t.after(() => sup.stop());
  await sup.start();
  const sock = join(dir, 'disk.sock');
  const c = await connect(sock);
  const model = Buffer.alloc(SIZE);
  const write = async (off: number, len: number, byte: number, fua = false) => {
    const b = Buffer.alloc(len, byte);
    await c.write(off, b, { fua });
    b.copy(model, off);
  };
  await write(0, 65536, 0x11);
  // no interval: only the flush itself can bring the checkpoint it waits for
  // the daemon counts the releases, each sent inside one checkpoint's barrier
  const releases = async () => ((await sup.primary!.qmp.execute('x-query-block-flush-commit')) as Array<{ releases: number }>)[0]!.releases;
  await c.flush();
  assert.equal(await releases(), 1);
  for (let i = 0; i < 8; i++) await write((i + 1) * MiB / 2, 4096, 0x20 + i);
  await Promise.all(Array.from({ length: 8 }, () => c.flush()));
  const used = (await releases()) - 1;
  assert.ok(used >= 1 && used < 8, `8 flushes sent together took ${used} checkpoints`);
  await write(7 * MiB, 4096, 0x77, true); // FUA: acknowledged once checkpointed too
  const durable = Buffer.from(model);
  // acknowledged without a flush: never promised, and here never checkpointed
  await write(6 * MiB, 65536, 0x66);
  const lease = (await sup.primary!.qmp.execute('x-query-block-lease')) as Array<{ valid: boolean; renewals: number; expiries: number }>;
  assert.equal(lease[0]!.valid, true);
  assert.ok(lease[0]!.renewals >= 1);
  c.destroy();
  const failedOver = new Promise((r) => sup.once('failed-over', r));
  sup.crashPrimary();
  await failedOver;
  assert.ok(logs.includes("the old primary's lease has run out"), 'failover waited for the lease');
  const r = await connect(sock);
  const got = await r.read(0, SIZE);
  await r.disconnect();
  assert.equal(got.findIndex((b, i) => b !== durable[i]), -1, 'the recovered disk is the last checkpoint, with every acknowledged flush');
});

test('pair with --flush-commit off and --lease off: flushes complete without a checkpoint, nothing is leased', async (t) => {
  const dir = tempDir(t);
  const sup = pair(dir, { flushCommit: false, leaseMs: 0 });
  t.after(() => sup.stop());
  await sup.start();
  const c = await connect(join(dir, 'disk.sock'));
  await c.write(0, Buffer.alloc(4096, 1), { fua: true });
  await c.flush();
  assert.equal(sup.status().checkpoints, 0);
  assert.deepEqual(await sup.primary!.qmp.execute('x-query-block-flush-commit'), []);
  assert.deepEqual(await sup.primary!.qmp.execute('x-query-block-lease'), []);
  await c.disconnect();
});
