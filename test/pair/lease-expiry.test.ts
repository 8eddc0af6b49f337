// `lockstep pair --on-lease-expiry` (issue 17), one host, real daemons: the supervisor stops
// renewing the primary's lease (as a hung supervisor would) and a client writes once it has
// run out. With io-error the write fails with EIO and never lands; with hold (the default) it
// waits, lands once the lease is renewed, and fails for good if the primary is demoted
// instead. Order of events only: "still waiting" is the daemon's own count of held writes.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { PairSupervisor, type PairOptions } from '../../src/pair/supervisor.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import { tempDir } from '../helpers/graph.js';

const MiB = 1024 * 1024;
const SIZE = 4 * MiB;
const isEio = (e: unknown) => (e as { code?: string }).code === 'EIO';

interface LeaseStatus {
  valid: boolean;
  'on-expiry': string;
  held: number;
  expiries: number;
}

async function startPair(t: { after(fn: () => unknown): void }, extra: Partial<PairOptions>) {
  const dir = tempDir(t);
  const sup = new PairSupervisor({
    dataDir: dir,
    size: SIZE,
    checkpointIntervalMs: 0,
    heartbeatIntervalMs: 50,
    heartbeatTimeoutMs: 400,
    // nothing here may fail over: the primary stays, only its lease lapses
    failover: 'manual',
    nbdSocket: join(dir, 'disk.sock'),
    log: () => {},
    ...extra,
  });
  t.after(() => sup.stop());
  await sup.start();
  const c = await NbdClient.connect({ address: { type: 'unix', path: join(dir, 'disk.sock') }, exportName: 'disk' });
  t.after(() => c.destroy());
  const p = sup.primary!;
  const lease = async () => ((await p.qmp.execute('x-query-block-lease')) as LeaseStatus[])[0]!;
  /** the supervisor stops renewing; returns once the daemon says the lease ran out */
  const lapse = async () => {
    sup.lease!.stop();
    await p.qmp.waitEvent('X_BLOCK_LEASE_EXPIRED', (d) => d['node-name'] === 'colo-disk0');
    assert.equal((await lease()).valid, false);
  };
  return { sup, c, p, lease, lapse };
}

/** A promise and whether it has settled yet. */
function track<T>(p: Promise<T>) {
  const s = { settled: false, p };
  p.then(
    () => (s.settled = true),
    () => (s.settled = true),
  );
  return s;
}

async function until(what: string, fn: () => Promise<boolean>): Promise<void> {
  for (let i = 0; !(await fn()); i++) {
    if (i > 2000) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

test('pair --on-lease-expiry io-error: a write after the lease ran out fails with EIO and never lands; renewed, writes land again', async (t) => {
  const { sup, c, p, lease, lapse } = await startPair(t, { onLeaseExpiry: 'io-error' });
  assert.equal((await lease())['on-expiry'], 'io-error', 'the supervisor passed the choice to the daemon');
  const model = Buffer.alloc(SIZE);
  await c.write(0, Buffer.alloc(65536, 0x11));
  model.fill(0x11, 0, 65536);

  await lapse();
  await assert.rejects(c.write(MiB, Buffer.alloc(65536, 0xee)), isEio);
  await assert.rejects(c.write(0, Buffer.alloc(4096, 0xef)), isEio);
  assert.equal((await lease()).held, 0, 'io-error holds nothing');
  assert.ok((await c.read(0, SIZE)).equals(model), 'the failed writes never landed');

  // renewed by a supervisor that still sees it as primary: writes go on
  await sup.lease!.start(p);
  assert.ok((await c.read(0, SIZE)).equals(model), 'nothing landed at the renewal either');
  await c.write(2 * MiB, Buffer.alloc(4096, 0x22));
  model.fill(0x22, 2 * MiB, 2 * MiB + 4096);
  assert.ok((await c.read(0, SIZE)).equals(model));
  assert.equal((await lease()).expiries, 1);
});

test('pair --on-lease-expiry hold (the default): a write after the lease ran out waits, lands at the renewal; held again and demoted, it fails and never lands', async (t) => {
  const { sup, c, p, lease, lapse } = await startPair(t, {});
  assert.equal((await lease())['on-expiry'], 'suspend-io');
  const model = Buffer.alloc(SIZE);
  await c.write(0, Buffer.alloc(65536, 0x11));
  model.fill(0x11, 0, 65536);

  await lapse();
  const held = track(c.write(MiB, Buffer.alloc(4096, 0x33)));
  await until('the write to be held', async () => (await lease()).held === 1);
  assert.ok((await c.read(0, SIZE)).equals(model), 'the held write has not landed; reads go on');
  assert.equal(held.settled, false);
  await sup.lease!.start(p);
  assert.deepEqual((await p.qmp.waitEvent('X_BLOCK_LEASE_RESUMED')).data, { 'node-name': 'colo-disk0', held: 1 });
  await held.p;
  model.fill(0x33, MiB, MiB + 4096);
  assert.ok((await c.read(0, SIZE)).equals(model), 'the held write landed once renewed');

  // held again, then the primary is demoted (a failover): it fails, never lands
  await lapse();
  const lost = track(c.write(3 * MiB, Buffer.alloc(4096, 0x44)));
  await until('the write to be held', async () => (await lease()).held === 1);
  assert.deepEqual(await sup.call(p, 'x-block-lease-demote', { 'node-name': 'colo-disk0' }), { failed: 1 });
  await assert.rejects(lost.p, isEio);
  assert.ok((await c.read(0, SIZE)).equals(model), 'the demoted write never landed');
});
