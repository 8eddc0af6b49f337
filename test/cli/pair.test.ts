// `lockstep pair` from the command line: option errors, then a pair run by the CLI, driven with
// `lockstep pair status|checkpoint|failover` and read through its Prometheus endpoint.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { createServer } from 'node:net';
import { tempDir } from '../helpers/graph.js';
import { LOCKSTEP_BIN } from '../helpers/processes.js';
import { NbdClient } from '../../src/nbd/client/client.js';

const MiB = 1024 * 1024;

function lockstep(args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [LOCKSTEP_BIN, ...args], { encoding: 'utf8', timeout: 60_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as { port: number }).port;
  await new Promise((r) => s.close(r));
  return port;
}

test('bad options are refused with a message naming them', () => {
  const cases: Array<[string[], RegExp]> = [
    [['pair', 'run', '--size', 'lots'], /--size: invalid size 'lots'|Parameter 'size'|invalid size/],
    [['pair', 'run', '--failover', 'sometimes'], /--failover: expected auto or manual, got 'sometimes'/],
    [['pair', 'run', '--checkpoint-interval', 'soon'], /--checkpoint-interval: expected a duration/],
    [['pair', 'run', '--nbd-port', '70000'], /--nbd-port: invalid port '70000'/],
    [['pair', 'run', '--secondary-nbd', 'nohost'], /--secondary-nbd: expected HOST:PORT, got 'nohost'/],
    [['pair', 'run', '--tls-creds', 'x'], /--tls-creds and --tls-client-creds need --tls-dir/],
    [['pair', 'frobnicate'], /unknown command 'frobnicate'/],
    [['pair', 'host'], /--listen HOST:PORT is required/],
    [['pair', 'host', '--listen', '10.1.2.3:4444'], /give --tls-dir DIR .* or --insecure/],
    [['pair', 'status', '--control', '/nonexistent/pair.sock'], /cannot reach the pair supervisor/],
  ];
  for (const [args, re] of cases) {
    const r = lockstep(args);
    assert.equal(r.status, 1, `${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr, re, args.join(' '));
  }
});

test('a pair run by the CLI: status, checkpoints, metrics, a manual failover', { timeout: 120_000 }, async (t) => {
  const dir = tempDir(t, 'lockstep-cli-pair-');
  const port = await freePort();
  const child = spawn(
    process.execPath,
    [LOCKSTEP_BIN, 'pair', 'run', '--data-dir', dir, '--size', '8M', '--nbd-port', '0', '--checkpoint-interval', '0.1',
      '--failover=manual', '--metrics', `127.0.0.1:${port}`],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (out += d.toString()));
  const exited = new Promise<number | null>((r) => child.once('exit', (c) => r(c)));
  t.after(async () => {
    child.kill('SIGKILL');
    await exited;
  });
  for (let i = 0; !out.includes('lockstep pair is running'); i++) {
    assert.ok(i < 600 && child.exitCode === null, `the pair did not start: ${out}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  const sock = join(dir, 'disk.sock');
  assert.match(out, new RegExp(`nbd\\+unix:///disk\\?socket=${sock.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')}`));
  const c = await NbdClient.connect({ address: { type: 'unix', path: sock }, exportName: 'disk' });
  await c.write(MiB, Buffer.alloc(4096, 0x5a));
  await c.disconnect();

  const cp = lockstep(['pair', 'checkpoint', '--data-dir', dir]);
  assert.equal(cp.status, 0, cp.stderr);
  const times = JSON.parse(cp.stdout) as { pauseMs: number; holdMs: number; checkpointMs: number; releaseMs: number };
  assert.ok(times.pauseMs >= times.holdMs + times.checkpointMs);
  const st = JSON.parse(lockstep(['pair', 'status', '--data-dir', dir]).stdout) as Record<string, unknown>;
  assert.equal(st.stage, 'protected');
  assert.equal(st.role, 'primary serving');
  assert.ok((st.checkpoints as number) >= 1);
  for (const k of ['last-pause-ms', 'bytes-forwarded', 'dirty-clusters', 'heartbeat-age-ms']) assert.ok(k in st, k);

  const metrics = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
  assert.match(metrics, /^lockstep_pair_info\{role="primary serving",stage="protected"\} 1$/m);
  assert.match(metrics, /^lockstep_pair_checkpoints_total [1-9]\d*$/m);
  assert.match(metrics, /^lockstep_pair_checkpoint_pause_seconds_count [1-9]\d*$/m);

  const fo = lockstep(['pair', 'failover', '--data-dir', dir]);
  assert.equal(fo.status, 0, fo.stderr);
  assert.equal((JSON.parse(fo.stdout) as { stage: string }).stage, 'failed-over');
  // the recovered disk: the write above was covered by a checkpoint
  const r = await NbdClient.connect({ address: { type: 'unix', path: sock }, exportName: 'disk' });
  assert.ok((await r.read(MiB, 4096)).equals(Buffer.alloc(4096, 0x5a)));
  await r.disconnect();
  child.kill('SIGTERM');
  assert.equal(await exited, 0);
});
