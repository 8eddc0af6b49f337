// A write the primary failed to forward (its replication filter's sticky error) is missing on
// the secondary while the primary acknowledged it. No checkpoint may then succeed: the
// secondary would take a view lacking that write for a checkpoint, and a failover would serve
// it. Found with a whole-disk discard whose forward outlasted the link's I/O timeout (issue 14);
// here the forward is made to time out by stopping the secondary past it.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { PairSupervisor } from '../../src/pair/supervisor.js';
import { ForwardError } from '../../src/pair/checkpoint.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import { tempDir } from '../helpers/graph.js';


test('a write the primary could not forward fails every later checkpoint; a failover serves the last good one', { timeout: 120_000 }, async (t) => {
  const dir = tempDir(t);
  const sup = new PairSupervisor({
    dataDir: dir,
    size: 8 * 1024 * 1024,
    checkpointIntervalMs: 0,
    heartbeatIntervalMs: 50,
    heartbeatTimeoutMs: 500,
    // a forward link that times out long before the secondary's loss bound (by default it
    // follows that bound, so that a stall liveness tolerates never fails a forward)
    forwardTimeoutMs: 1000,
    // the stopped secondary is late, never lost: only the forward fails
    heartbeatLostMs: 60_000,
    leaseMs: 0,
    failover: 'auto',
    nbdSocket: join(dir, 'disk.sock'),
    log: () => {},
  });
  t.after(() => sup.stop());
  await sup.start();
  const c = await NbdClient.connect({ address: { type: 'unix', path: join(dir, 'disk.sock') }, exportName: 'disk' });
  t.after(() => c.destroy());
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

  await assert.rejects(sup.checkpoint(), (e: unknown) => e instanceof ForwardError && e.code === 'EIO');
  await assert.rejects(sup.checkpoint(), ForwardError, 'the forward error is sticky: every later checkpoint fails too');
  const st = sup.status();
  assert.equal(st['checkpoint-failures'], 2);
  assert.equal(st.checkpoints, 1);
  assert.match(st['last-error'] ?? '', /forward to the secondary failed/);

  c.destroy();
  const failedOver = new Promise((r) => sup.once('failed-over', r));
  sup.crashPrimary();
  await failedOver;
  const s = await NbdClient.connect({ address: { type: 'unix', path: join(dir, 'disk.sock') }, exportName: 'disk' });
  t.after(() => s.destroy());
  assert.ok((await s.read(0, 65536)).equals(a), 'the failover serves the last good checkpoint');
});
