// `lockstep daemon` as a process: options, start-up errors, pidfile, daemonize, signals,
// TCP and TLS monitors and the loopback rule.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { createServer } from 'node:net';
import { tempDir } from '../helpers/graph.js';
import { runLockstep, startDaemon } from '../helpers/daemon.js';
import { makeTlsDirs, requireTool } from '../helpers/tls.js';
import { QmpClient } from '../../src/qmp/client.js';

async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', () => r()));
  const port = (s.address() as { port: number }).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

test('--help prints the options and exits 0', async () => {
  const r = await runLockstep(['daemon', '--help']);
  assert.equal(r.code, 0);
  for (const opt of ['--blockdev', '--nbd-server', '--export', '--chardev', '--monitor', '--object', '--pidfile', '--daemonize', '--log-level', '--insecure', '--default']) {
    assert.ok(r.stdout.includes(opt), `help mentions ${opt}`);
  }
});

test('bad options give one clear line and exit 1', async (t) => {
  const dir = tempDir(t);
  const cases: Array<[string[], string]> = [
    [['--frobnicate'], "lockstep daemon: unrecognized option '--frobnicate'\n"],
    [['--blockdev'], "lockstep daemon: option '--blockdev' needs an argument\n"],
    [['--monitor', 'chardev=nope'], 'lockstep daemon: --monitor: chardev "nope" not found\n'],
    [['--nbd-server', 'addr.type=inet,addr.host=127.0.0.1'], "lockstep daemon: --nbd-server: Parameter 'addr.port' is missing\n"],
    [['--nbd-server', 'addr.type=tcp'], "lockstep daemon: --nbd-server: Parameter 'type' does not accept value 'tcp'\n"],
    [['--export', 'nbd,id=e0'], "lockstep daemon: --export: Parameter 'node-name' is missing\n"],
    [['--export', 'nbd,id=e0,node-name=n,writable=maybe'], "lockstep daemon: --export: Parameter 'writable' expects 'on' or 'off'\n"],
    [['--object', 'tls-creds-x509,id=t0,dir=/nonexist,endpoint=server'], 'lockstep daemon: Unable to access credentials /nonexist/ca-cert.pem: No such file or directory\n'],
    [['--blockdev', 'driver=raw,node-name=r0,file.driver=file'], "lockstep daemon: Parameter 'file.filename' is missing\n"],
    [['--blockdev', 'driver=null-co,node-name=n0,bogus=1'], "lockstep daemon: Parameter 'bogus' is unexpected\n"],
    [['--blockdev', '{"driver":"null-co","node-name":"n0","read-only":"on"}'], "lockstep daemon: Invalid parameter type for 'read-only', expected: boolean\n"],
    [['--chardev', `socket,id=c0,path=${join(dir, 'q.sock')},server=on`, '--monitor', 'c0', '--monitor', 'chardev=c0'], "lockstep daemon: --monitor: chardev 'c0' is already in use\n"],
    [['--log-level', 'loud'], "lockstep daemon: --log-level: 'loud' is not one of debug, info, warn, error, silent\n"],
    [['--chardev', `socket,id=c0,path=${join(dir, 'q.sock')}`], "lockstep daemon: --chardev: chardev 'c0': only server=on sockets are supported\n"],
  ];
  for (const [args, expected] of cases) {
    const r = await runLockstep(['daemon', '--log-level', 'silent', ...args]);
    assert.equal(r.stderr, expected, args.join(' '));
    assert.equal(r.code, 1, args.join(' '));
  }
});

test('a keyval and a JSON --blockdev, pidfile written and removed, SIGTERM exits 0 after closing nodes', async (t) => {
  const dir = tempDir(t);
  const pidfile = join(dir, 'daemon.pid');
  const d = await startDaemon(t, dir, [
    '--blockdev',
    'driver=null-co,node-name=n0,size=1M',
    '--blockdev',
    '{"driver":"raw","node-name":"r0","file":"n0"}',
    '--pidfile',
    pidfile,
  ]);
  assert.equal(readFileSync(pidfile, 'utf8').trim(), String(d.proc.pid));
  const c = await d.client();
  const nodes = (await c.execute('query-named-block-nodes')) as Array<{ 'node-name': string }>;
  assert.deepEqual(
    nodes.map((n) => n['node-name']).sort(),
    ['n0', 'r0'],
  );
  d.proc.kill('SIGTERM');
  const ev = await c.waitEvent('SHUTDOWN');
  assert.deepEqual(ev.data, { guest: false, reason: 'host-signal' });
  assert.equal(await d.exited, 0);
  assert.equal(existsSync(pidfile), false);
  assert.equal(existsSync(d.qmpPath), false);
  const logs = d.logs();
  assert.ok(logs.every((l) => typeof l.time === 'string' && typeof l.level === 'string' && typeof l.msg === 'string'));
  assert.ok(logs.some((l) => l.msg === 'signal received' && l.signal === 'SIGTERM'));
  assert.ok(logs.some((l) => l.msg === 'shut down'));
});

test('SIGINT shuts down gracefully too', async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, dir, ['--blockdev', 'driver=null-co,node-name=n0']);
  d.proc.kill('SIGINT');
  assert.equal(await d.exited, 0);
});

test('--daemonize returns once the daemon is ready; the daemon keeps serving', async (t) => {
  const dir = tempDir(t);
  const pidfile = join(dir, 'd.pid');
  const sock = join(dir, 'qmp.sock');
  const r = await runLockstep([
    'daemon',
    '--daemonize',
    '--pidfile',
    pidfile,
    '--blockdev',
    'driver=null-co,node-name=n0',
    '--chardev',
    `socket,id=m,path=${sock},server=on,wait=off`,
    '--monitor',
    'm',
  ]);
  assert.equal(r.code, 0, r.stderr);
  const pid = Number(readFileSync(pidfile, 'utf8'));
  t.after(() => {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      /* gone */
    }
  });
  const c = await QmpClient.open({ type: 'unix', path: sock });
  assert.deepEqual(
    ((await c.execute('query-named-block-nodes')) as Array<{ 'node-name': string }>).map((n) => n['node-name']),
    ['n0'],
  );
  await c.execute('quit');
  await c.waitEvent('SHUTDOWN');
  c.close();
  for (let i = 0; i < 100 && existsSync(pidfile); i++) await new Promise((res) => setTimeout(res, 50));
  assert.equal(existsSync(pidfile), false);

  const bad = await runLockstep(['daemon', '--daemonize', '--blockdev', 'driver=nope,node-name=x']);
  assert.equal(bad.code, 1);
  assert.equal(bad.stderr, "lockstep daemon: Parameter 'driver' does not accept value 'nope'\n");
});

test('a plain TCP monitor binds to loopback only, unless --insecure', async (t) => {
  const dir = tempDir(t);
  const refused = await runLockstep(['daemon', '--chardev', 'socket,id=m,host=0.0.0.0,port=0,server=on,wait=off', '--monitor', 'm']);
  assert.equal(refused.code, 1);
  assert.match(refused.stderr, /refusing a plain TCP monitor on non-loopback address 0\.0\.0\.0: use tls-creds=ID, a loopback address, or --insecure/);

  const port = await freePort();
  const d = await startDaemon(t, dir, ['--chardev', `socket,id=tcp,host=127.0.0.1,port=${port},server=on,wait=off`, '--monitor', 'chardev=tcp']);
  const c = await QmpClient.open({ type: 'inet', host: '127.0.0.1', port });
  t.after(() => c.close());
  assert.deepEqual(await c.execute('query-named-block-nodes'), []);

  const port2 = await freePort();
  const d2 = await startDaemon(t, join(dir), ['--insecure', '--chardev', `socket,id=tcp,host=0.0.0.0,port=${port2},server=on,wait=off`, '--monitor', 'chardev=tcp'], { monitor: false });
  assert.ok(d2.logs().some((l) => l.level === 'warn' && String(l.msg).includes('without TLS (--insecure)')));
  const c2 = await QmpClient.open({ type: 'inet', host: '127.0.0.1', port: port2 });
  c2.close();
  void d;
});

test('a TLS monitor with verify-peer admits only clients with a certificate from the CA', async (t) => {
  if (!requireTool(t, 'openssl', ['version'])) return;
  const dir = tempDir(t);
  const tls = makeTlsDirs(dir);
  const port = await freePort();
  await startDaemon(
    t,
    dir,
    [
      '--object',
      `tls-creds-x509,id=tls0,dir=${tls.server},endpoint=server,verify-peer=on`,
      '--chardev',
      `socket,id=tcp,host=0.0.0.0,port=${port},server=on,wait=off,tls-creds=tls0`,
      '--monitor',
      'chardev=tcp',
    ],
    { monitor: false },
  );
  const opts = (d: string, withCert: boolean) => ({
    tls: {
      ca: readFileSync(join(d, 'ca-cert.pem')),
      ...(withCert ? { cert: readFileSync(join(d, 'client-cert.pem')), key: readFileSync(join(d, 'client-key.pem')) } : {}),
      servername: 'localhost',
    },
    timeoutMs: 5000,
  });
  const good = await QmpClient.open({ type: 'inet', host: '127.0.0.1', port }, opts(tls.client, true));
  assert.deepEqual(await good.execute('query-named-block-nodes'), []);
  good.close();
  const cli = await runLockstep(['qmp', '--host', '127.0.0.1', '--port', String(port), '--tls-dir', tls.client, 'query-named-block-nodes']);
  assert.equal(cli.code, 0, cli.stderr);
  assert.equal(cli.stdout, '[]\n');
  const rogueCli = await runLockstep(['qmp', '--host', '127.0.0.1', '--port', String(port), '--tls-dir', tls.rogue, 'query-named-block-nodes']);
  assert.equal(rogueCli.code, 1);
  assert.match(rogueCli.stderr, /^lockstep qmp: cannot talk to the monitor at 127\.0\.0\.1:\d+: /);
  await assert.rejects(async () => {
    const c = await QmpClient.open({ type: 'inet', host: '127.0.0.1', port }, opts(tls.rogue, true));
    c.close();
  });
  await assert.rejects(async () => {
    const c = await QmpClient.open({ type: 'inet', host: '127.0.0.1', port }, opts(tls.anonymous, false));
    c.close();
  });
  // a plain client does not get a greeting either
  await assert.rejects(async () => {
    const c = await QmpClient.open({ type: 'inet', host: '127.0.0.1', port }, { timeoutMs: 1000 });
    c.close();
  });
});
