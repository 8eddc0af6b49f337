// The systemd units in systemd/: `systemd-analyze verify` finds nothing to say about them (with
// the binary they name installed, as .ci/run does), they restart on failure, keep their data
// under a StateDirectory, and the processes they start really report readiness: a notify
// socket made here (by python3: Node has no Unix datagram sockets) receives READY=1 with the
// main pid, from `lockstep pair host` and from `lockstep pair run`.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { createServer } from 'node:net';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from '../helpers/graph.js';
import { LOCKSTEP_BIN, REPO_ROOT, requireTool } from '../helpers/processes.js';

const UNITS = ['lockstep-pair.service', 'lockstep-pair-host.service'];
const INSTALLED_BIN = '/usr/local/bin/lockstep';

function unit(name: string): Map<string, string[]> {
  const keys = new Map<string, string[]>();
  for (const line of readFileSync(join(REPO_ROOT, 'systemd', name), 'utf8').split('\n')) {
    const m = /^([A-Za-z]+)=(.*)$/.exec(line);
    if (m) keys.set(m[1]!, [...(keys.get(m[1]!) ?? []), m[2]!]);
  }
  return keys;
}

test('systemd-analyze verify accepts the units without a warning', (t) => {
  if (!requireTool('systemd-analyze')) return t.skip('systemd-analyze is not installed');
  if (!existsSync(INSTALLED_BIN)) {
    if (process.env.CI) throw new Error(`${INSTALLED_BIN} is missing: .ci/run installs it before the tests`);
    return t.skip(`${INSTALLED_BIN} is not installed (the path the units name)`);
  }
  const r = spawnSync('systemd-analyze', ['verify', ...UNITS.map((u) => join(REPO_ROOT, 'systemd', u))], { encoding: 'utf8' });
  assert.equal(r.status, 0, r.stdout + r.stderr);
  assert.equal((r.stdout + r.stderr).trim(), '', 'systemd-analyze verify warned');
});

test('the units restart on failure, keep their data in a StateDirectory and wait for readiness', () => {
  for (const name of UNITS) {
    const u = unit(name);
    assert.deepEqual(u.get('Restart'), ['on-failure'], name);
    assert.deepEqual(u.get('Type'), ['notify'], name);
    assert.deepEqual(u.get('NotifyAccess'), ['all'], name);
    const exec = u.get('ExecStart')![0]!.split(/\s+/);
    assert.equal(exec[0], INSTALLED_BIN, name);
    const state = u.get('StateDirectory')![0]!.split(/\s+/).map((d) => `/var/lib/${d}`);
    assert.ok(state.includes(u.get('WorkingDirectory')![0]!), `${name}: WorkingDirectory is a StateDirectory`);
    const dataDir = exec.indexOf('--data-dir');
    if (dataDir >= 0) assert.ok(state.includes(exec[dataDir + 1]!), `${name}: --data-dir is a StateDirectory`);
  }
  assert.deepEqual(unit('lockstep-pair.service').get('ExecStart')![0]!.split(/\s+/).slice(1, 3), ['pair', 'run']);
  assert.deepEqual(unit('lockstep-pair-host.service').get('ExecStart')![0]!.split(/\s+/).slice(1, 3), ['pair', 'host']);
  // the supervisor stops its own daemons (quit over QMP) before anything is killed
  assert.deepEqual(unit('lockstep-pair.service').get('KillMode'), ['mixed']);
});

const RECEIVER = `
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
s.settimeout(float(sys.argv[2]))
print('bound', flush=True)
print(s.recv(4096).decode(), flush=True)
`;

async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as { port: number }).port;
  await new Promise((r) => s.close(r));
  return port;
}

/** Starts `lockstep ARGS` with NOTIFY_SOCKET set and returns what it sent there. */
async function readiness(t: { after(fn: () => unknown): void }, dir: string, args: string[]): Promise<{ message: string; pid: number }> {
  const sock = join(dir, `notify-${args[1]}.sock`);
  const rx = spawn('python3', ['-c', RECEIVER, sock, '90'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let got = '';
  rx.stdout.on('data', (d: Buffer) => (got += d.toString()));
  const rxExit = new Promise<number | null>((r) => rx.once('exit', (c) => r(c)));
  t.after(() => rx.kill());
  for (let i = 0; !got.startsWith('bound'); i++) {
    assert.ok(i < 1200 && rx.exitCode === null, `the receiver did not start: ${got}`);
    await new Promise((r) => setTimeout(r, 25));
  }
  const child = spawn(process.execPath, [LOCKSTEP_BIN, ...args], { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, NOTIFY_SOCKET: sock } });
  let err = '';
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  t.after(async () => {
    child.kill('SIGTERM');
    await exited;
  });
  const first = await Promise.race([rxExit.then((c) => `receiver exited ${c}`), exited.then(() => 'lockstep exited')]);
  assert.equal(first, 'receiver exited 0', `no readiness message: ${err}`);
  return { message: got.slice('bound\n'.length), pid: child.pid! };
}

test('lockstep pair host and lockstep pair run send READY=1 once they serve', { timeout: 120_000 }, async (t) => {
  if (!requireTool('systemd-notify') || !requireTool('python3')) return t.skip('systemd-notify or python3 is not installed');
  const dir = tempDir(t, 'lockstep-notify-');
  const host = await readiness(t, dir, ['pair', 'host', '--listen', `127.0.0.1:${await freePort()}`, '--insecure']);
  assert.match(host.message, /^READY=1$/m);
  assert.match(host.message, new RegExp(`^MAINPID=${host.pid}$`, 'm'), 'pair host');
  const run = await readiness(t, dir, ['pair', 'run', '--data-dir', join(dir, 'pair'), '--size', '4M', '--nbd-port', '0']);
  assert.match(run.message, /^READY=1$/m);
  assert.match(run.message, new RegExp(`^MAINPID=${run.pid}$`, 'm'), 'pair run: the supervisor, not a daemon it started');
  assert.match(run.message, /^STATUS=protected: serving nbd\+unix:/m);
});
