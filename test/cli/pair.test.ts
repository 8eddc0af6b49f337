// `lockstep pair` from the command line: option errors, then a pair run by the CLI, driven with
// `lockstep pair status|checkpoint|failover` and read through its Prometheus endpoint. The
// scrape is read with parse-prometheus-text-format (a port of the Prometheus project's own
// parser) and checked against the series docs/replication.md documents.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { createServer } from 'node:net';
import { readFileSync } from 'node:fs';
import parsePrometheusTextFormat, { type PromFamily } from 'parse-prometheus-text-format';
import { tempDir } from '../helpers/graph.js';
import { LOCKSTEP_BIN, REPO_ROOT } from '../helpers/processes.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import { QmpClient } from '../../src/qmp/client.js';
import { startDaemon } from '../helpers/daemon.js';
import { parseHostArgs } from '../../src/cli/pair.js';

const MiB = 1024 * 1024;

function lockstep(args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [LOCKSTEP_BIN, ...args], { encoding: 'utf8', timeout: 60_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** The series docs/replication.md lists in its metrics table: name, labels and type. */
function documentedSeries(): Array<{ name: string; labels: string[]; type: string }> {
  const doc = readFileSync(join(REPO_ROOT, 'docs', 'replication.md'), 'utf8');
  const out: Array<{ name: string; labels: string[]; type: string }> = [];
  for (const m of doc.matchAll(/^\| `(lockstep_[a-z_]+)(?:\{([a-z_,]+)\})?` \| (gauge|counter|histogram) \|/gm)) {
    out.push({ name: m[1]!, labels: m[2] ? m[2].split(',') : [], type: m[3]! });
  }
  return out;
}

/** Scrapes /metrics and parses it; the value of one series by its labels. */
async function scrape(port: number): Promise<{ families: PromFamily[]; value(name: string, labels?: Record<string, string>): number }> {
  const res = await fetch(`http://127.0.0.1:${port}/metrics`);
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-type') ?? '', /^text\/plain; version=0\.0\.4/);
  const families = parsePrometheusTextFormat(await res.text());
  return {
    families,
    value(name, labels = {}) {
      const f = families.find((x) => x.name === name);
      assert.ok(f, `no ${name} in the scrape`);
      const s = f.metrics.find((m) => Object.entries(labels).every(([k, v]) => m.labels?.[k] === v));
      assert.ok(s, `no ${name}${JSON.stringify(labels)} in the scrape`);
      return Number(s.value ?? s.count);
    },
  };
}

/** Each side's generation and consistency as `pair status --json` reports them. */
function sidesOf(dir: string): Record<'primary' | 'secondary', { generation: string; consistent: boolean }> {
  const r = lockstep(['pair', 'status', '--json', '--data-dir', dir]);
  assert.equal(r.status, 0, r.stderr);
  return (JSON.parse(r.stdout) as { sides: Record<'primary' | 'secondary', { generation: string; consistent: boolean }> }).sides;
}

/** One side's lockstep_pair_device_generation_info series: [generation label, value]. */
function generationSeries(families: PromFamily[], side: string): Array<[string | undefined, string | undefined]> {
  const f = families.find((x) => x.name === 'lockstep_pair_device_generation_info');
  assert.ok(f, 'no lockstep_pair_device_generation_info in the scrape');
  return f.metrics.filter((s) => s.labels?.side === side).map((s) => [s.labels?.generation, s.value]);
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
    [['pair', 'run', '--dirty-extent', '3M'], /--dirty-extent: expected a power of two from 64K to 1G, got '3M'/],
    [['pair', 'run', '--dirty-extent', '4K'], /--dirty-extent: expected a power of two from 64K to 1G, got '4K'/],
    [['pair', 'run', '--copy-unit', '2K'], /--copy-unit: expected a power of two from 4K to 64K, got '2K'/],
    [['pair', 'run', '--copy-unit', '12K'], /--copy-unit: expected a power of two from 4K to 64K, got '12K'/],
    [['pair', 'run', '--copy-unit', '128K'], /--copy-unit: expected a power of two from 4K to 64K, got '128K'/],
    [['pair', 'run', '--nbd-port', '70000'], /--nbd-port: invalid port '70000'/],
    [['pair', 'run', '--secondary-nbd', 'nohost'], /--secondary-nbd: expected HOST:PORT, got 'nohost'/],
    [['pair', 'run', '--tls-creds', 'x'], /--tls-creds and --tls-client-creds need --tls-dir/],
    [['pair', 'run', '--on-lease-expiry', 'panic'], /^lockstep pair: --on-lease-expiry: expected hold \(or suspend-io\) or io-error, got 'panic'\n$/],
    [['pair', '--on-lease-expiry=', '--size', '8M'], /--on-lease-expiry: expected hold \(or suspend-io\) or io-error, got ''/],
    [['pair', 'run', '--lease', 'off', '--on-lease-expiry', 'io-error'], /--on-lease-expiry: there is no lease with --lease off/],
    [['pair', 'frobnicate'], /unknown command 'frobnicate'/],
    [['pair', 'host'], /--listen HOST:PORT is required/],
    [['pair', 'host', '--listen', '10.1.2.3:4444'], /give --tls-dir DIR .* or --insecure/],
    [['pair', 'host', '--insecure', '--listen'], /^lockstep --listen needs a value\n$/],
    [['pair', 'host', '--tls-dir'], /^lockstep --tls-dir needs a value\n$/],
    [['pair', 'status', '--control', '/nonexistent/pair.sock'], /cannot reach the pair supervisor/],
    [['pair', 'run', '--log-format', 'xml'], /--log-format: 'xml' is not one of json, human/],
    [['pair', 'run', '--metrics', 'nowhere'], /--metrics: expected HOST:PORT, got 'nowhere'/],
    [['pair', 'checkpoint', '--watch'], /--json, --watch, --interval and --check are options of 'lockstep pair status'/],
    [['pair', 'status', '--watch', '--interval', '0'], /--interval: must be more than 0/],
    [['daemon', '--log-format', 'xml'], /--log-format: 'xml' is not one of json, human/],
    [['pair', 'takeover'], /lockstep pair takeover: --qmp ADDR is required/],
    [['pair', 'takeover', '--qmp', '/nonexistent/q.sock'], /lockstep pair takeover: --dir DIR is required/],
    [['pair', 'takeover', '--qmp', 'nowhere', '--dir', '/tmp'], /--qmp: expected a socket path or HOST:PORT, got 'nowhere'/],
    [['pair', 'takeover', '--qmp', '10.1.2.3:4444', '--dir', '/tmp'], /--qmp 10\.1\.2\.3:4444: plain TCP to another host: give --tls-dir DIR, or --insecure/],
    [['pair', 'takeover', '--qmp', '/nonexistent/q.sock', '--dir', '/tmp', '--lease', 'soon'], /--lease: expected a duration/],
    [['pair', 'takeover', '--qmp', '/nonexistent/q.sock', '--dir', '/tmp', '--nbd-port', '70000'], /--nbd-port: invalid port '70000'/],
    [['pair', 'takeover', '--qmp', '127.0.0.1:4444', '--dir', '/tmp', '--tls-dir', '/nonexistent'], /TLS credentials: cannot read \/nonexistent\/ca-cert\.pem/],
    [['pair', 'takeover', '--qmp', '/nonexistent/q.sock', '--dir', '/tmp'], /lockstep pair takeover: .*ENOENT/],
    [['pair', 'checkpoint', '--qmp', '/x.sock'], /--qmp and --dir are options of 'lockstep pair takeover'/],
  ];
  for (const [args, re] of cases) {
    const r = lockstep(args);
    assert.equal(r.status, 1, `${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr, re, args.join(' '));
  }
});

test('pair takeover is refused on a daemon that is not the live secondary of a pair, and changes nothing', async (t) => {
  const dir = tempDir(t, 'lockstep-takeover-');
  const d = await startDaemon(t, dir, []);
  const r = lockstep(['pair', 'takeover', '--qmp', d.qmpPath, '--dir', dir]);
  assert.equal(r.status, 1, r.stderr);
  assert.match(r.stderr, /^lockstep pair takeover: refusing to take over: this daemon is not the secondary of a running pair \(no replication in mode secondary\)/);
  const c = await d.client();
  assert.deepEqual(await c.execute('query-block-exports'), [], 'nothing is served');
});

test('pair host keeps its own options and passes every other word on to the daemon, in order', () => {
  assert.deepEqual(
    parseHostArgs([
      '--blockdev', 'driver=null-co,node-name=n0', '--listen', '10.0.0.1:4444', '--log-level=debug', '--insecure',
      '--object', 'secret,id=s0,data=x', '-v', '--tls-dir=/etc/pki', '--', '--listen',
    ]),
    {
      listen: '10.0.0.1:4444',
      tlsDir: '/etc/pki',
      insecure: true,
      rest: ['--blockdev', 'driver=null-co,node-name=n0', '--log-level=debug', '--object', 'secret,id=s0,data=x', '-v', '--', '--listen'],
    },
  );
  // a group of short options is one word: it passes once; --insecure=x is not ours
  assert.deepEqual(parseHostArgs(['-ab', '--insecure=yes', '--listen=h:1']), { listen: 'h:1', insecure: false, rest: ['-ab', '--insecure=yes'] });
  assert.throws(() => parseHostArgs(['--listen']), { message: '--listen needs a value' });
});

test('a pair run by the CLI: status, checkpoints, metrics, a manual failover', { timeout: 120_000 }, async (t) => {
  const dir = tempDir(t, 'lockstep-cli-pair-');
  const port = await freePort();
  const child = spawn(
    process.execPath,
    [LOCKSTEP_BIN, 'pair', 'run', '--data-dir', dir, '--size', '8M', '--nbd-port', '0', '--checkpoint-interval', '0.1',
      '--failover=manual', '--metrics', `127.0.0.1:${port}`, '--on-lease-expiry', 'io-error'],
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
  // --on-lease-expiry reached the primary daemon's lease
  const pq = await QmpClient.open({ type: 'unix', path: join(dir, 'primary.qmp') });
  assert.equal(((await pq.execute('x-query-block-lease')) as Array<{ 'on-expiry': string }>)[0]!['on-expiry'], 'io-error');
  pq.close();

  const cp = lockstep(['pair', 'checkpoint', '--data-dir', dir]);
  assert.equal(cp.status, 0, cp.stderr);
  const times = JSON.parse(cp.stdout) as { pauseMs: number; holdMs: number; checkpointMs: number; releaseMs: number };
  assert.ok(times.pauseMs >= times.holdMs + times.checkpointMs);
  // piped, status prints the JSON object; --json does the same
  const st = JSON.parse(lockstep(['pair', 'status', '--data-dir', dir]).stdout) as Record<string, unknown>;
  assert.equal(st.stage, 'protected');
  assert.equal(st.role, 'primary serving');
  assert.ok((st.checkpoints as number) >= 1);
  for (const k of ['last-pause-ms', 'hidden-copied-bytes', 'dirty-clusters', 'heartbeat-age-ms']) assert.ok(k in st, k);
  assert.ok(!('bytes-forwarded' in st), 'renamed hidden-copied-bytes');
  assert.equal((JSON.parse(lockstep(['pair', 'status', '--json', '--data-dir', dir]).stdout) as { stage: string }).stage, 'protected');
  const check = lockstep(['pair', 'status', '--check', '--data-dir', dir]);
  assert.equal(check.status, 0, check.stderr);
  assert.match(check.stdout, /^protected: primary serving, last pause \d/);

  // --watch, piped: one JSON object per line until interrupted
  const watch = spawn(process.execPath, [LOCKSTEP_BIN, 'pair', 'status', '--watch', '--interval', '0.1', '--data-dir', dir], { stdio: ['ignore', 'pipe', 'pipe'] });
  let watched = '';
  watch.stdout.on('data', (d: Buffer) => (watched += d.toString()));
  const watchExit = new Promise<number | null>((r) => watch.once('exit', (c) => r(c)));
  for (let i = 0; watched.split('\n').length < 4; i++) {
    assert.ok(i < 400, `--watch printed ${watched}`);
    await new Promise((r) => setTimeout(r, 25));
  }
  watch.kill('SIGINT');
  assert.equal(await watchExit, 0);
  const lines = watched.trim().split('\n');
  for (const l of lines) assert.equal((JSON.parse(l) as { stage: string }).stage, 'protected');

  // every documented series is in the scrape with its type and labels, and nothing else is
  const documented = documentedSeries();
  assert.ok(documented.length >= 10, `docs/replication.md lists ${documented.length} series`);
  let m = await scrape(port);
  for (const d of documented) {
    const f = m.families.find((x) => x.name === d.name);
    assert.ok(f, `${d.name} is documented but not in the scrape`);
    assert.equal(f.type, d.type.toUpperCase(), d.name);
    assert.ok(f.metrics.length >= 1, `${d.name} has no sample`);
    for (const s of f.metrics) assert.deepEqual(Object.keys(s.labels ?? {}).sort(), [...d.labels].sort(), `${d.name}'s labels`);
  }
  for (const f of m.families) assert.ok(documented.some((d) => d.name === f.name), `${f.name} is not documented`);
  assert.equal(m.value('lockstep_pair_stage', { stage: 'protected' }), 1);
  assert.equal(m.families.find((f) => f.name === 'lockstep_pair_stage')!.metrics.reduce((a, s) => a + Number(s.value), 0), 1);
  assert.equal(m.value('lockstep_pair_role', { side: 'primary', role: 'Primary' }), 1);
  assert.equal(m.value('lockstep_pair_role', { side: 'secondary', role: 'Secondary' }), 1);
  assert.equal(m.value('lockstep_pair_connection_state', { state: 'Connected' }), 1);
  assert.equal(m.value('lockstep_pair_peerdevice_outofsync_bytes', { peer: 'secondary', disk: 'disk' }), 0);
  assert.ok(m.value('lockstep_pair_checkpoints_total') >= 1);
  assert.equal(m.value('lockstep_pair_checkpoint_failures_total'), 0);
  // the 4 KiB write above made the secondary keep its old cluster in the hidden disk
  assert.ok(m.value('lockstep_pair_hidden_copied_bytes_total') >= 4096);
  assert.ok(m.value('lockstep_pair_heartbeat_age_seconds', { side: 'primary' }) >= 0);
  assert.ok(m.value('lockstep_pair_checkpoint_pause_seconds') >= 1);
  const pause = m.families.find((f) => f.name === 'lockstep_pair_checkpoint_pause_seconds')!.metrics[0]!;
  assert.equal(pause.buckets?.['+Inf'], pause.count);
  // each side's disk after the initial sync: consistent, one generation series, the id the
  // status reports
  const synced = sidesOf(dir);
  assert.equal(synced.primary.generation, synced.secondary.generation, 'in step: one generation');
  for (const side of ['primary', 'secondary'] as const) {
    assert.equal(synced[side].consistent, true, side);
    assert.equal(m.value('lockstep_pair_device_consistent', { side }), 1, side);
    assert.deepEqual(generationSeries(m.families, side), [[synced[side].generation, '1']], side);
  }

  const fo = lockstep(['pair', 'failover', '--data-dir', dir]);
  assert.equal(fo.status, 0, fo.stderr);
  assert.equal((JSON.parse(fo.stdout) as { stage: string }).stage, 'failed-over');
  const after = lockstep(['pair', 'status', '--check', '--data-dir', dir]);
  assert.equal(after.status, 4, after.stdout + after.stderr);
  assert.match(after.stdout, /^failed-over: secondary serving/);
  m = await scrape(port);
  assert.equal(m.value('lockstep_pair_stage', { stage: 'failed-over' }), 1);
  assert.equal(m.value('lockstep_pair_role', { side: 'secondary', role: 'Primary' }), 1);
  assert.equal(m.value('lockstep_pair_role', { side: 'primary', role: 'Unknown' }), 1);
  assert.equal(m.value('lockstep_pair_connection_state', { state: 'StandAlone' }), 1);
  // the survivor went on under a new generation: the scrape has it and no longer the old one
  const failed = sidesOf(dir);
  assert.notEqual(failed.secondary.generation, synced.secondary.generation);
  assert.equal(failed.secondary.consistent, true);
  assert.equal(m.value('lockstep_pair_device_consistent', { side: 'secondary' }), 1);
  for (const side of ['primary', 'secondary'] as const) assert.deepEqual(generationSeries(m.families, side), [[failed[side].generation, '1']], side);
  // the recovered disk: the write above was covered by a checkpoint
  const r = await NbdClient.connect({ address: { type: 'unix', path: sock }, exportName: 'disk' });
  assert.ok((await r.read(MiB, 4096)).equals(Buffer.alloc(4096, 0x5a)));
  await r.disconnect();
  child.kill('SIGTERM');
  assert.equal(await exited, 0);
  const gone = lockstep(['pair', 'status', '--check', '--data-dir', dir]);
  assert.equal(gone.status, 7, gone.stdout + gone.stderr);
  assert.match(gone.stdout, /^not running: cannot reach the pair supervisor/);
  // piped, the logs were JSON lines (none glued to another, no in-place progress)
  const logs = out.split('\n').filter((l) => l.startsWith('{'));
  assert.ok(logs.some((l) => (JSON.parse(l) as { msg: string }).msg === 'replication is running'), out);
  assert.ok(!out.includes('\r'), 'no in-place line when not on a terminal');
  for (const l of logs) assert.equal((JSON.parse(l) as { component: string }).component, 'pair');
});
