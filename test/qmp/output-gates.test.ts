// The primary's served-node gates on a real daemon, through a real NBD client: output commit
// (a flush or FUA write completes only at x-block-flush-commit-release; plain writes and
// reads never wait) and the lease (writes held or failed once it runs out, resumed by a
// renewal, failed for good by a demotion). Order of events only: "still waiting" is checked
// by the daemon's own count of what waits, never by elapsed time.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { NbdClient } from '../../src/nbd/client/client.js';
import type { QmpClient } from '../../src/qmp/client.js';
import { tempDir } from '../helpers/graph.js';
import { startDaemon } from '../helpers/daemon.js';

const SIZE = 4 * 1024 * 1024;
const isEio = (e: unknown) => (e as { code?: string }).code === 'EIO';

/** A promise and whether it has settled yet. */
function track<T>(p: Promise<T>) {
  const s = { settled: false, ok: false, error: null as unknown, p };
  p.then(
    () => ((s.settled = true), (s.ok = true)),
    (e: unknown) => ((s.settled = true), (s.error = e)),
  );
  return s;
}

async function served(t: { after(fn: () => unknown): void }) {
  const dir = tempDir(t);
  const d = await startDaemon(t, dir, []);
  const q = await d.client();
  const sock = join(dir, 'nbd.sock');
  const img = join(dir, 'disk.raw');
  writeFileSync(img, Buffer.alloc(0));
  truncateSync(img, SIZE);
  await q.execute('blockdev-add', { driver: 'raw', 'node-name': 'disk0', file: { driver: 'file', filename: img } });
  await q.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
  await q.execute('block-export-add', { type: 'nbd', id: 'disk', 'node-name': 'disk0', name: 'disk', writable: true });
  const c = await NbdClient.connect({ address: { type: 'unix', path: sock }, exportName: 'disk' });
  t.after(() => c.destroy());
  return { d, q, c, img };
}

const flushStatus = async (q: QmpClient) => ((await q.execute('x-query-block-flush-commit')) as Array<Record<string, number>>)[0]!;
const leaseStatus = async (q: QmpClient) => ((await q.execute('x-query-block-lease')) as Array<Record<string, unknown>>)[0]!;

async function until(what: string, fn: () => Promise<boolean>): Promise<void> {
  for (let i = 0; !(await fn()); i++) {
    if (i > 2000) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

test('flush commit: flushes and FUA writes wait for a release, one release answers all of them; plain writes and reads go on', async (t) => {
  const { q, c } = await served(t);
  await q.execute('x-block-flush-commit', { 'node-name': 'disk0', enable: true });
  await c.write(0, Buffer.alloc(4096, 1));
  const flush = track(c.flush());
  const ev = await q.waitEvent('X_BLOCK_FLUSH_PENDING');
  assert.deepEqual(ev.data, { 'node-name': 'disk0', releases: 0 });
  const fua = track(c.write(8192, Buffer.alloc(4096, 2), { fua: true }));
  await until('two waiting completions', async () => (await flushStatus(q)).pending === 2);
  // neither FUA-less writes nor reads wait behind them
  await c.write(65536, Buffer.alloc(4096, 3));
  assert.deepEqual(await c.read(8192, 4096), Buffer.alloc(4096, 2));
  assert.equal(flush.settled || fua.settled, false);
  // the checkpoint's barrier: the hold does not wait for the waiting completions
  await q.execute('block-io-hold', { 'node-name': 'disk0' });
  assert.deepEqual(await q.execute('x-block-flush-commit-release', { 'node-name': 'disk0' }), { released: 2, releases: 1 });
  await q.execute('block-io-release', { 'node-name': 'disk0' });
  await flush.p;
  await fua.p;
  assert.deepEqual(await flushStatus(q), { 'node-name': 'disk0', pending: 0, releases: 1, released: 2 });
  // the next one raises the event again, naming the releases so far
  const again = track(c.flush());
  assert.deepEqual((await q.waitEvent('X_BLOCK_FLUSH_PENDING')).data, { 'node-name': 'disk0', releases: 1 });
  // switching it off lets what waits complete
  await q.execute('x-block-flush-commit', { 'node-name': 'disk0', enable: false });
  await again.p;
  await c.flush();
  assert.deepEqual(await q.execute('x-query-block-flush-commit'), []);
});

test('flush commit: bad requests are named', async (t) => {
  const { q } = await served(t);
  await assert.rejects(q.execute('x-block-flush-commit', { 'node-name': 'nope', enable: true }), /Cannot find device=nope nor node-name=nope|nope/);
  await assert.rejects(q.execute('x-block-flush-commit-release', { 'node-name': 'disk0' }), /Flush commit is not enabled on node 'disk0'/);
  await q.execute('x-block-flush-commit', { 'node-name': 'disk0', enable: true });
  await assert.rejects(q.execute('x-block-flush-commit', { 'node-name': 'disk0', enable: true }), /already enabled on node 'disk0'/);
  await assert.rejects(q.execute('x-block-flush-commit', { 'node-name': 'disk0' }), /enable/);
});

test('lease: a renewal counts from its since (never shortening the lease); bad arguments are named', async (t) => {
  const { q, c } = await served(t);
  const g = (await q.execute('x-block-lease', { 'node-name': 'disk0', 'duration-ms': 60_000 })) as { clock: number; deadline: number };
  assert.equal(g.deadline - g.clock, 60_000);
  // a late renewal (since long past) does not cut the lease short
  const r = (await q.execute('x-block-lease', { 'node-name': 'disk0', 'duration-ms': 1, since: 0 })) as { deadline: number };
  assert.equal(r.deadline, g.deadline);
  await c.write(0, Buffer.alloc(4096, 1));
  await assert.rejects(q.execute('x-block-lease', { 'node-name': 'disk0', 'duration-ms': 5, since: g.clock + 1e9 }), /Parameter 'since' must be a clock value this daemon returned/);
  await assert.rejects(q.execute('x-block-lease', { 'node-name': 'disk0', 'duration-ms': 0 }), /Parameter 'duration-ms' must be a positive number/);
  await assert.rejects(q.execute('x-block-lease', { 'node-name': 'disk0', 'duration-ms': 5, 'on-expiry': 'panic' }), /on-expiry/);
  // a lease that started before it was granted ends at since + duration: here, already
  await q.execute('blockdev-add', { driver: 'null-co', 'node-name': 'other', size: SIZE });
  await q.execute('x-block-lease', { 'node-name': 'other', 'duration-ms': 1, since: 0 });
  assert.deepEqual((await q.waitEvent('X_BLOCK_LEASE_EXPIRED', (d) => d['node-name'] === 'other')).data, { 'node-name': 'other', 'on-expiry': 'suspend-io' });
  const st = (await q.execute('x-query-block-lease')) as Array<{ 'node-name': string; valid: boolean; renewals: number }>;
  assert.deepEqual(st.map((x) => [x['node-name'], x.valid, x.renewals]), [['disk0', true, 2], ['other', false, 1]]);
});

test('lease: run out, a write is held and reads go on; renewed, it lands', async (t) => {
  const { q, c } = await served(t);
  await c.write(0, Buffer.alloc(4096, 1));
  await q.execute('x-block-lease', { 'node-name': 'disk0', 'duration-ms': 1 });
  await q.waitEvent('X_BLOCK_LEASE_EXPIRED', (d) => d['node-name'] === 'disk0');
  const held = track(c.write(4096, Buffer.alloc(4096, 2)));
  await until('the write to be held', async () => (await leaseStatus(q)).held === 1);
  assert.deepEqual(await c.read(0, 4096), Buffer.alloc(4096, 1), 'reads are not fenced');
  assert.equal(held.settled, false);
  await q.execute('x-block-lease', { 'node-name': 'disk0', 'duration-ms': 60_000 });
  assert.deepEqual((await q.waitEvent('X_BLOCK_LEASE_RESUMED')).data, { 'node-name': 'disk0', held: 1 });
  await held.p;
  assert.deepEqual(await c.read(4096, 4096), Buffer.alloc(4096, 2));
  assert.equal((await leaseStatus(q)).expiries, 1);
});

test('lease: demoted, held writes and flushes fail and never land, and so does every later write', async (t) => {
  const { q, c, img } = await served(t);
  await q.execute('x-block-lease', { 'node-name': 'disk0', 'duration-ms': 1 });
  await q.waitEvent('X_BLOCK_LEASE_EXPIRED', (d) => d['node-name'] === 'disk0');
  const lost = track(c.write(8192, Buffer.alloc(4096, 3)));
  const flush = track(c.flush());
  await until('the write and the flush to be held', async () => (await leaseStatus(q)).held === 2);
  assert.deepEqual(await q.execute('x-block-lease-demote', { 'node-name': 'disk0' }), { failed: 2 });
  await assert.rejects(lost.p, isEio);
  await assert.rejects(flush.p, isEio);
  await assert.rejects(c.write(12288, Buffer.alloc(4096, 4)), isEio);
  await assert.rejects(q.execute('x-block-lease', { 'node-name': 'disk0', 'duration-ms': 60_000 }), /node 'disk0' was demoted: its lease cannot be renewed/);
  assert.deepEqual(await c.read(8192, 8192), Buffer.alloc(8192), 'the fenced writes never landed');
  assert.deepEqual(readFileSync(img).subarray(8192, 16384), Buffer.alloc(8192));
});

test('lease: with on-expiry io-error a write fails at once when it has run out', async (t) => {
  const { q, c } = await served(t);
  await q.execute('x-block-lease', { 'node-name': 'disk0', 'duration-ms': 1, 'on-expiry': 'io-error' });
  await q.waitEvent('X_BLOCK_LEASE_EXPIRED');
  await assert.rejects(c.write(0, Buffer.alloc(4096, 9)), isEio);
  assert.deepEqual(await c.read(0, 4096), Buffer.alloc(4096));
  await q.execute('x-block-lease', { 'node-name': 'disk0', 'duration-ms': 60_000 });
  await c.write(0, Buffer.alloc(4096, 9));
  assert.deepEqual(await c.read(0, 4096), Buffer.alloc(4096, 9));
});

test('demotion with flush commit on: the waiting flush fails and is never acknowledged', async (t) => {
  const { q, c } = await served(t);
  await q.execute('x-block-flush-commit', { 'node-name': 'disk0', enable: true });
  await q.execute('x-block-lease', { 'node-name': 'disk0', 'duration-ms': 60_000 });
  await c.write(0, Buffer.alloc(4096, 1));
  const flush = track(c.flush());
  await q.waitEvent('X_BLOCK_FLUSH_PENDING');
  assert.deepEqual(await q.execute('x-block-lease-demote', { 'node-name': 'disk0' }), { failed: 1 });
  await assert.rejects(flush.p, isEio);
});
