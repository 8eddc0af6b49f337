// A write the primary failed to forward (its replication filter's sticky error) is missing on
// the secondary while the primary acknowledged it. No checkpoint may then succeed: the
// secondary would take a view lacking that write for a checkpoint, and a failover would serve
// it. Found with a whole-disk discard whose forward outlasted the link's I/O timeout (issue 14);
// here the forward is made to time out by stopping the secondary past it, and also to fail
// outright (the secondary's export taken away) while its daemon answers. Either way the pair
// does not stay `protected` with every checkpoint failing: the secondary is taken out
// (degraded) and brought back, resynced, as a lost one is.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { PairSupervisor } from '../../src/pair/supervisor.js';
import { ForwardError } from '../../src/pair/checkpoint.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import { tempDir } from '../helpers/graph.js';
import { QmpClient } from '../../src/qmp/client.js';
import { FORWARD_EXPORT } from '../../src/pair/setup.js';
import type { PairOptions } from '../../src/pair/options.js';


/** An 8 MiB pair with automatic failover and no lease, started, and a client of its disk. */
async function startPair(t: { after(fn: () => unknown): void }, dir: string, extra: Partial<PairOptions>): Promise<{ sup: PairSupervisor; c: NbdClient }> {
  const sup = new PairSupervisor({
    dataDir: dir,
    size: 8 * 1024 * 1024,
    checkpointIntervalMs: 0,
    heartbeatIntervalMs: 50,
    heartbeatTimeoutMs: 500,
    leaseMs: 0,
    failover: 'auto',
    nbdSocket: join(dir, 'disk.sock'),
    log: () => {},
    ...extra,
  });
  t.after(() => sup.stop());
  await sup.start();
  const c = await NbdClient.connect({ address: { type: 'unix', path: join(dir, 'disk.sock') }, exportName: 'disk' });
  t.after(() => c.destroy());
  return { sup, c };
}

/** Kills the primary, waits for the failover, and reads the served disk's first `length` bytes. */
async function failOverAndRead(t: { after(fn: () => unknown): void }, sup: PairSupervisor, dir: string, length: number): Promise<Buffer> {
  const failedOver = new Promise((r) => sup.once('failed-over', r));
  sup.crashPrimary();
  await failedOver;
  const s = await NbdClient.connect({ address: { type: 'unix', path: join(dir, 'disk.sock') }, exportName: 'disk' });
  t.after(() => s.destroy());
  return s.read(0, length);
}

test('a write the primary could not forward fails the checkpoint; the secondary is brought back and resynced, then a failover serves every write', { timeout: 120_000 }, async (t) => {
  const dir = tempDir(t);
  const { sup, c } = await startPair(t, dir, {
    // a forward link that times out long before the secondary's loss bound (by default it
    // follows that bound, so that a stall liveness tolerates never fails a forward)
    forwardTimeoutMs: 1000,
    // the stopped secondary is late, never lost: only the forward fails
    heartbeatLostMs: 60_000,
  });
  const a = Buffer.alloc(65536, 0xa1);
  await c.write(0, a);
  await sup.checkpoint();

  // the secondary stopped past the link's I/O timeout: the forward of this write fails,
  // the primary's own write succeeds and the request is acknowledged
  const pid = sup.pids().secondary!;
  process.kill(pid, 'SIGSTOP');
  let resumed = false;
  t.after(() => {
    if (!resumed) process.kill(pid, 'SIGCONT');
  });
  const b = Buffer.alloc(65536, 0xb2);
  const written = c.write(0, b);
  // the write cannot complete before the forward's watchdog gives up on the stopped secondary
  await written;
  process.kill(pid, 'SIGCONT');
  resumed = true;
  assert.ok((await c.read(0, 65536)).equals(b), 'the primary serves the acknowledged write');

  // the checkpoint fails: the secondary lacks an acknowledged write and keeps its last good
  // checkpoint; it is taken out of the pair (degraded) and brought back, resynced from the
  // two change records, while the primary serves
  const degraded = new Promise((r) => sup.once('degraded', r));
  const protectedAgain = new Promise((r) => sup.once('protected', r));
  await assert.rejects(sup.checkpoint(), (e: unknown) => e instanceof ForwardError && e.code === 'EIO');
  await degraded;
  const st = sup.status();
  assert.equal(st['checkpoint-failures'], 1);
  assert.equal(st.checkpoints, 1);
  assert.match(st['last-error'] ?? '', /forward to the secondary failed: the primary keeps serving without protection/);
  // degraded: a flush completes on the primary alone (no checkpoint to wait for)
  await c.flush();
  await protectedAgain;
  const union = sup.status()['last-reprotect']?.union ?? [];
  assert.ok(union.some((r) => r.offset <= 0 && r.offset + r.length >= 65536), `the resync copied the unforwarded write: ${JSON.stringify(union)}`);

  // protected again: checkpoints succeed, and a failover serves the write that was not forwarded
  const d = Buffer.alloc(65536, 0xd4);
  await c.write(131072, d);
  // (the re-protection's own checkpoint may still run: this one then follows it)
  await sup.checkpoint();
  assert.equal(sup.status()['checkpoint-failures'], 1, 'no checkpoint failed after the one that found the forward error');
  c.destroy();
  const want = Buffer.alloc(8 * 1024 * 1024);
  b.copy(want, 0);
  d.copy(want, 131072);
  assert.ok((await failOverAndRead(t, sup, dir, want.length)).equals(want), 'the failover serves every acknowledged write: the resync brought the unforwarded one over');
});

test('a forward refused while the secondary answers (its export taken away): degraded at the next checkpoint, brought back, every write kept', { timeout: 120_000 }, async (t) => {
  const dir = tempDir(t);
  const logs: string[] = [];
  const { sup, c } = await startPair(t, dir, { reprotectBackoffMs: 100, log: (level, msg) => logs.push(`${level}: ${msg}`) });
  const a = Buffer.alloc(65536, 0x3a);
  await c.write(0, a);
  await sup.checkpoint();

  // the secondary's daemon stays up and answers its heartbeats; only the forward breaks
  const q = await QmpClient.open({ type: 'unix', path: join(dir, 'secondary.qmp') });
  t.after(() => q.close());
  await q.execute('block-export-del', { id: FORWARD_EXPORT, mode: 'hard' });
  q.close();
  const b = Buffer.alloc(65536, 0x3b);
  await c.write(65536, b); // acknowledged by the primary's own write; the forward fails
  assert.equal(sup.stage, 'protected', 'nothing has noticed yet: the forward does not vote');

  const degraded = new Promise((r) => sup.once('degraded', r));
  const protectedAgain = new Promise((r) => sup.once('protected', r));
  await assert.rejects(sup.checkpoint(), ForwardError);
  await degraded;
  assert.equal(sup.status().checkpoints, 1);
  await protectedAgain;
  assert.ok(logs.some((l) => /forward to the secondary failed.*taking the secondary out of the pair/.test(l)), logs.join('\n'));
  // (the re-protection's own checkpoint may still run: this one then follows it)
  await sup.checkpoint();
  assert.equal(sup.status()['checkpoint-failures'], 1, 'no checkpoint failed after the one that found the forward error');

  c.destroy();
  const want = Buffer.alloc(8 * 1024 * 1024);
  a.copy(want, 0);
  b.copy(want, 65536);
  assert.ok((await failOverAndRead(t, sup, dir, want.length)).equals(want), 'the survivor has the write whose forward failed');
});
