// Checkpoint requests are serialised: one barrier at a time; a request arriving during one
// joins the single follow-up barrier; none of them releases a hold it does not own.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { connect } from 'node:net';
import { join } from 'node:path';
import { CheckpointQueue } from '../../src/pair/checkpoint.js';
import { PairSupervisor } from '../../src/pair/supervisor.js';
import { serveControl } from '../../src/pair/control.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import { tempDir } from '../helpers/graph.js';

test('the queue runs one barrier at a time and latecomers share the next one', async () => {
  let active = 0;
  let maxActive = 0;
  let runs = 0;
  const gates: Array<() => void> = [];
  const q = new CheckpointQueue(async () => {
    active++;
    maxActive = Math.max(maxActive, active);
    const n = ++runs;
    await new Promise<void>((r) => gates.push(r));
    active--;
    return n;
  });
  const first = q.request();
  const late = Array.from({ length: 50 }, () => q.request());
  assert.equal(runs, 1);
  gates.shift()!();
  assert.equal(await first, 1);
  await new Promise((r) => setImmediate(r));
  assert.equal(runs, 2);
  // one arriving now (the follow-up is running) waits for a third
  const third = q.request();
  gates.shift()!();
  assert.deepEqual(new Set(await Promise.all(late)), new Set([2]));
  await new Promise((r) => setImmediate(r));
  gates.shift()!();
  assert.equal(await third, 3);
  assert.equal(maxActive, 1);
});

test('a failed barrier does not stop the follow-up', async () => {
  let n = 0;
  const q = new CheckpointQueue(async () => {
    n++;
    await new Promise((r) => setTimeout(r, 5));
    if (n === 1) throw new Error('first fails');
    return n;
  });
  const a = q.request();
  const b = q.request();
  await assert.rejects(a, /first fails/);
  assert.equal(await b, 2);
});

test('2000 checkpoint requests in one write to the control socket: every one succeeds', async (t) => {
  const dir = tempDir(t);
  const sup = new PairSupervisor({
    dataDir: dir,
    size: 8 * 1024 * 1024,
    checkpointIntervalMs: 0,
    heartbeatIntervalMs: 50,
    heartbeatTimeoutMs: 2000,
    failover: 'manual',
    nbdSocket: join(dir, 'disk.sock'),
    log: () => {},
  });
  t.after(() => sup.stop());
  await sup.start();
  const ctl = await serveControl(sup, join(dir, 'pair.sock'));
  t.after(() => ctl.close());
  const client = await NbdClient.connect({ address: { type: 'unix', path: join(dir, 'disk.sock') }, exportName: 'disk' });
  t.after(() => client.disconnect());
  let writing = true;
  const load = (async () => {
    for (let i = 0; writing; i++) await client.write((i % 64) * 65536, Buffer.alloc(4096, i % 255));
  })();
  const N = 2000;
  const replies = await new Promise<Array<{ ok: boolean; error?: string }>>((resolve, reject) => {
    const sock = connect(join(dir, 'pair.sock'));
    let buf = '';
    const out: Array<{ ok: boolean; error?: string }> = [];
    sock.setEncoding('utf8');
    sock.on('error', reject);
    sock.on('connect', () => sock.write(`${JSON.stringify({ cmd: 'checkpoint' })}\n`.repeat(N)));
    sock.on('data', (d: string) => {
      buf += d;
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        out.push(JSON.parse(buf.slice(0, nl)) as { ok: boolean; error?: string });
        buf = buf.slice(nl + 1);
      }
      if (out.length === N) {
        sock.end();
        resolve(out);
      }
    });
  });
  writing = false;
  await load;
  const failed = replies.filter((r) => !r.ok);
  assert.deepEqual(failed, []);
  const st = sup.status();
  assert.equal(st['checkpoint-failures'], 0);
  assert.equal(st.stage, 'protected');
  // serialised and shared: far fewer barriers than requests, at least one
  assert.ok(st.checkpoints >= 1 && st.checkpoints < N / 2, `${st.checkpoints} barriers`);
});
