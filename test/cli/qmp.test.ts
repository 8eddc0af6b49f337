// `lockstep qmp` against a running `lockstep daemon`.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { tempDir } from '../helpers/graph.js';
import { runLockstep, startDaemon } from '../helpers/daemon.js';
import { parseQmpArgs } from '../../src/cli/qmp.js';

test('lockstep qmp options: they end at the command; bad ones are named', async () => {
  assert.deepEqual(parseQmpArgs(['--socket', '/run/q.sock', '--pretty', 'blockdev-add', '--socket', 'x=1']), {
    socket: '/run/q.sock',
    pretty: true,
    rest: ['blockdev-add', '--socket', 'x=1'],
  });
  assert.deepEqual(parseQmpArgs(['--host', 'h', '--port', '4444', '--tls-dir=/pki']), { host: 'h', port: 4444, tlsDir: '/pki', rest: [] });
  assert.deepEqual(parseQmpArgs(['-h', '--bogus']), { help: true, rest: [] });
  assert.throws(() => parseQmpArgs(['--bogus', 'query-status']), { message: "unrecognized option '--bogus'" });
  assert.throws(() => parseQmpArgs(['--pretty=yes']), { message: "unrecognized option '--pretty=yes'" });
  assert.throws(() => parseQmpArgs(['--', 'query-status']), { message: "unrecognized option '--'" });
  assert.throws(() => parseQmpArgs(['--socket']), { message: "option '--socket' needs an argument" });
  for (const [args, stderr] of [
    [['--bogus'], "lockstep qmp: unrecognized option '--bogus'\n"],
    [['--port'], "lockstep qmp: option '--port' needs an argument\n"],
    [['--host', 'h'], 'lockstep qmp: --host and --port go together (port 1..65535)\n'],
  ] as const) {
    const r = await runLockstep(['qmp', ...args]);
    assert.equal(r.code, 1);
    assert.equal(r.stderr, stderr);
  }
});

test('lockstep qmp one-shot commands', async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, dir, ['--blockdev', 'driver=null-co,node-name=n0,size=1M']);
  const qmp = (...args: string[]) => runLockstep(['qmp', '--socket', d.qmpPath, ...args]);

  await t.test('key=value arguments are typed by the schema; the return value is printed as JSON', async () => {
    const r = await qmp('query-named-block-nodes', 'flat=true');
    assert.equal(r.code, 0, r.stderr);
    const nodes = JSON.parse(r.stdout) as Array<Record<string, unknown>>;
    assert.deepEqual(
      nodes.map((n) => n['node-name']),
      ['n0'],
    );
    assert.equal(r.stderr, '');
  });

  await t.test('free-form arguments (blockdev-add): dotted keys nest, numbers and booleans are guessed', async () => {
    const r = await qmp('blockdev-add', 'driver=raw', 'node-name=r0', 'file.driver=null-co', 'file.size=4096', 'read-only=true');
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, '{}\n');
    const q = JSON.parse((await qmp('query-named-block-nodes')).stdout) as Array<Record<string, unknown>>;
    const r0 = q.find((n) => n['node-name'] === 'r0')!;
    assert.equal(r0.ro, true);
    assert.equal((r0.image as Record<string, unknown>)['virtual-size'], 4096);
  });

  await t.test('a JSON object as the arguments', async () => {
    const r = await qmp('blockdev-del', '{"node-name": "r0"}');
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, '{}\n');
  });

  await t.test('errors print class and desc on stderr and exit 1', async () => {
    let r = await qmp('blockdev-del', 'node-name=nope');
    assert.equal(r.code, 1);
    assert.equal(r.stdout, '');
    assert.equal(r.stderr, "GenericError: Failed to find node with node-name='nope'\n");
    r = await qmp('frobnicate');
    assert.equal(r.code, 1);
    assert.equal(r.stderr, 'CommandNotFound: The command frobnicate has not been found\n');
    r = await qmp('query-named-block-nodes', 'flat=perhaps');
    assert.equal(r.code, 1);
    assert.equal(r.stderr, "lockstep qmp: Parameter 'flat' expects 'on' or 'off'\n");
    r = await qmp('query-named-block-nodes', 'flat');
    assert.equal(r.code, 1);
    assert.equal(r.stderr, "lockstep qmp: expected key=value, got 'flat'\n");
  });

  await t.test('an unreachable monitor is one line and exit 1', async () => {
    const r = await runLockstep(['qmp', '--socket', join(dir, 'nothing.sock'), 'query-version']);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /^lockstep qmp: cannot talk to the monitor at .*nothing\.sock: .*ENOENT.*\n$/);
  });

  await t.test('interactive mode runs lines and prints events', async () => {
    const r = await runLockstep(['qmp', '--socket', d.qmpPath], {
      input: 'query-named-block-nodes flat=true\nblockdev-del node-name=zz\nquit\n',
    });
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /"node-name":"n0"/);
    assert.match(r.stdout, /error: GenericError: Failed to find node with node-name='zz'/);
    assert.match(r.stdout, /event: \{"timestamp":\{"seconds":\d+,"microseconds":\d+\},"event":"SHUTDOWN","data":\{"guest":false,"reason":"host-qmp-quit"\}\}/);
    assert.equal(await d.exited, 0);
  });
});
