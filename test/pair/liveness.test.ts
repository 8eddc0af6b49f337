// Heartbeats measure liveness, not load (issue 14 item 2): a stalled daemon (SIGSTOP) is late,
// counted and shown, and the pair stays protected; only a side gone or silent past its bound
// is lost.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { livenessBounds } from '../../src/pair/liveness.js';
import { PairSupervisor } from '../../src/pair/supervisor.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import { tempDir } from '../helpers/graph.js';
import { startDaemon } from '../helpers/daemon.js';

test('the bounds: only a primary on another host is lost at the timeout itself', () => {
  const child = {} as never;
  assert.deepEqual(livenessBounds({ name: 'primary', child: null }, 500, 5000), { lateAfterMs: 500, lostAfterMs: 500 });
  assert.deepEqual(livenessBounds({ name: 'secondary', child: null }, 500, 5000), { lateAfterMs: 500, lostAfterMs: 5000 });
  assert.deepEqual(livenessBounds({ name: 'primary', child }, 500, 5000), { lateAfterMs: 500, lostAfterMs: 5000 });
  assert.deepEqual(livenessBounds({ name: 'primary', child: null, pid: 4242 }, 500, 5000), { lateAfterMs: 500, lostAfterMs: 5000 });
  assert.deepEqual(livenessBounds({ name: 'secondary', child }, 800, 300), { lateAfterMs: 800, lostAfterMs: 800 });
  // by the role played now: after a failover's re-protection the daemon started as primary is
  // the secondary (its silence costs nothing, the long bound) and the other one the primary
  assert.deepEqual(livenessBounds({ name: 'primary', child: null }, 500, 5000, 'secondary'), { lateAfterMs: 500, lostAfterMs: 5000 });
  assert.deepEqual(livenessBounds({ name: 'secondary', child: null }, 500, 5000, 'primary'), { lateAfterMs: 500, lostAfterMs: 500 });
});

function pair(dir: string): PairSupervisor {
  return new PairSupervisor({
    dataDir: dir,
    size: 8 * 1024 * 1024,
    checkpointIntervalMs: 0,
    heartbeatIntervalMs: 50,
    heartbeatTimeoutMs: 200,
    heartbeatLostMs: 4000,
    failover: 'auto',
    nbdSocket: join(dir, 'disk.sock'),
    log: () => {},
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function stall(pid: number, ms: number): Promise<void> {
  process.kill(pid, 'SIGSTOP');
  await sleep(ms);
  process.kill(pid, 'SIGCONT');
}

test('a stalled secondary is late, not lost: the pair stays protected and checkpoints go on', async (t) => {
  const dir = tempDir(t);
  const sup = pair(dir);
  t.after(() => sup.stop());
  await sup.start();
  await stall(sup.pids().secondary!, 1200);
  await sleep(200);
  const st = sup.status();
  assert.equal(st.stage, 'protected');
  assert.ok((st.heartbeats?.secondary?.late ?? 0) >= 1, JSON.stringify(st.heartbeats));
  assert.ok((st.heartbeats?.secondary?.['max-late-ms'] ?? 0) > 200, JSON.stringify(st.heartbeats));
  const c = await NbdClient.connect({ address: { type: 'unix', path: join(dir, 'disk.sock') }, exportName: 'disk' });
  await c.write(0, Buffer.alloc(4096, 0x5c));
  await c.disconnect();
  await sup.checkpoint();
  assert.match(sup.metrics.render(sup.status()), /^lockstep_pair_heartbeats_late_total\{side="secondary"\} [1-9]\d*$/m);
});

test('a stalled primary is not failed over while alive; a hung one is, after its bound', async (t) => {
  const dir = tempDir(t);
  const sup = pair(dir);
  t.after(() => sup.stop());
  await sup.start();
  const c = await NbdClient.connect({ address: { type: 'unix', path: join(dir, 'disk.sock') }, exportName: 'disk' });
  await c.write(0, Buffer.alloc(4096, 0x61));
  await sup.checkpoint();
  const pid = sup.pids().primary!;
  await stall(pid, 1200);
  // alive and serving again: the same connection goes on
  await c.write(4096, Buffer.alloc(4096, 0x62));
  assert.ok((await c.read(0, 8192)).equals(Buffer.concat([Buffer.alloc(4096, 0x61), Buffer.alloc(4096, 0x62)])));
  c.destroy();
  assert.equal(sup.stage, 'protected');
  assert.ok((sup.status().heartbeats?.primary?.late ?? 0) >= 1);
  // stopped for good: silent past the bound, it is lost and failed over
  const failedOver = new Promise((r) => sup.once('failed-over', r));
  process.kill(pid, 'SIGSTOP');
  await failedOver;
  assert.equal(sup.stage, 'failed-over');
});

test('a primary on another host whose monitor waits in a checkpoint\'s hold still answers its heartbeats: no failover', { timeout: 120_000 }, async (t) => {
  // The two-host shape (attached daemons): a silent primary is lost at the timeout itself.
  // A guest's request stays in flight on the primary while the secondary is stopped (its
  // forward waits), a checkpoint's block-io-hold waits for that request to drain, and the
  // primary's monitor answers nothing on the supervisor's connection until it has. The
  // heartbeats go on their own connection.
  const root = tempDir(t);
  const [dirA, dirB] = [join(root, 'a'), join(root, 'b')];
  mkdirSync(dirA);
  mkdirSync(dirB);
  const a = await startDaemon(t, dirA, []);
  const b = await startDaemon(t, dirB, []);
  t.after(() => {
    b.proc.kill('SIGCONT');
    a.proc.kill('SIGKILL');
    b.proc.kill('SIGKILL');
  });
  const logs: string[] = [];
  const sup = new PairSupervisor({
    dataDir: root,
    size: 8 * 1024 * 1024,
    checkpointIntervalMs: 0,
    heartbeatIntervalMs: 50,
    heartbeatTimeoutMs: 300,
    // the stopped secondary (and so the forward) is waited for this long
    heartbeatLostMs: 8000,
    failover: 'auto',
    primaryQmp: { type: 'unix', path: join(dirA, 'qmp.sock') },
    secondaryQmp: { type: 'unix', path: join(dirB, 'qmp.sock') },
    primaryDir: dirA,
    secondaryDir: dirB,
    nbdSocket: join(root, 'disk.sock'),
    log: (level, msg) => {
      logs.push(`${level}: ${msg}`);
      if (process.env.DEBUG_LIVENESS) console.error(new Date().toISOString(), level, msg);
    },
  });
  t.after(() => sup.stop());
  await sup.start();
  const c = await NbdClient.connect({ address: { type: 'unix', path: join(root, 'disk.sock') }, exportName: 'disk' });
  t.after(() => c.destroy());
  await c.write(0, Buffer.alloc(4096, 0x71));
  await sup.checkpoint();

  b.proc.kill('SIGSTOP');
  const inFlight = c.write(4096, Buffer.alloc(4096, 0x72));
  await sleep(100);
  const checkpoint = sup.checkpoint();
  // the hold waits for the write, the write for the stopped secondary: 6 heartbeat timeouts
  await sleep(1800);
  assert.equal(sup.stage, 'protected', logs.join('\n'));
  b.proc.kill('SIGCONT');
  await inFlight;
  await checkpoint;
  const st = sup.status();
  assert.equal(st.stage, 'protected', logs.join('\n'));
  assert.equal(st.heartbeats?.primary?.late, 0, JSON.stringify(st.heartbeats));
  assert.ok((st.heartbeats?.secondary?.late ?? 0) >= 1, 'the stopped secondary was late: ' + JSON.stringify(st.heartbeats));
  assert.equal(st.checkpoints, 2);
  assert.ok((await c.read(0, 8192)).equals(Buffer.concat([Buffer.alloc(4096, 0x71), Buffer.alloc(4096, 0x72)])));
});
