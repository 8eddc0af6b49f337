// `lockstep-qmp` (src/cli/qmp-lite.ts), the resource agent's cheap QMP entry point: several
// commands in one connection, one JSON line each, the first error ends the run.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { tempDir } from '../helpers/graph.js';
import { startDaemon } from '../helpers/daemon.js';
import { REPO_ROOT } from '../helpers/processes.js';
import { parseCalls } from '../../src/cli/qmp-lite.js';

const BIN = join(REPO_ROOT, 'bin', 'lockstep-qmp');

function lite(args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', timeout: 60_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

test('parseCalls: command names, each with an optional JSON object', () => {
  assert.deepEqual(parseCalls(['query-status', 'x-block-lease-demote', '{"node-name":"d"}']), [
    { execute: 'query-status' },
    { execute: 'x-block-lease-demote', arguments: { 'node-name': 'd' } },
  ]);
  assert.throws(() => parseCalls([]), /no command given/);
  assert.throws(() => parseCalls(['{"a":1}']), /arguments '\{"a":1\}' follow no command/);
  assert.throws(() => parseCalls(['q', '{"a":1}', '{"b":2}']), /follow no command/);
  assert.throws(() => parseCalls(['q', '[1]']), /expected a command name or a JSON object, got '\[1\]'/);
  assert.throws(() => parseCalls(['q', '{"a":']), /JSON/);
});

test('lockstep-qmp against a daemon: returns in order, errors, options', async (t) => {
  const dir = tempDir(t, 'lockstep-qmp-lite-');
  const d = await startDaemon(t, dir, []);
  let r = lite(['--socket', d.qmpPath, 'query-block-exports', 'blockdev-add', '{"driver":"null-co","node-name":"n0","size":4096}', 'query-named-block-nodes']);
  assert.equal(r.status, 0, r.stderr);
  const lines = r.stdout.trimEnd().split('\n');
  assert.equal(lines.length, 3);
  assert.deepEqual(JSON.parse(lines[0]!), []);
  assert.deepEqual(JSON.parse(lines[1]!), {});
  assert.ok((JSON.parse(lines[2]!) as Array<{ 'node-name': string }>).some((n) => n['node-name'] === 'n0'));
  // the first error ends the run: the command after it is not sent
  r = lite(['--socket', d.qmpPath, 'blockdev-del', '{"node-name":"nope"}', 'blockdev-del', '{"node-name":"n0"}']);
  assert.equal(r.status, 1);
  assert.equal(r.stdout, '');
  assert.match(r.stderr, /^GenericError: .*nope/);
  r = lite(['--socket', d.qmpPath, 'query-named-block-nodes']);
  assert.ok((JSON.parse(r.stdout) as Array<{ 'node-name': string }>).some((n) => n['node-name'] === 'n0'), 'n0 was not deleted');
  r = lite(['--socket', join(dir, 'none.sock'), 'query-version']);
  assert.equal(r.status, 1);
  assert.match(r.stderr, /^lockstep-qmp: cannot talk to the monitor at .*none\.sock: connect ENOENT/);
  for (const [args, re] of [
    [['query-version'], /give either --socket or --host\/--port/],
    [['--host', 'h', 'query-version'], /--host and --port go together/],
    [['--socket', d.qmpPath], /no command given/],
    [['--frob', 'x'], /unrecognized option '--frob'/],
  ] as Array<[string[], RegExp]>) {
    const e = lite(args);
    assert.equal(e.status, 1, args.join(' '));
    assert.match(e.stderr, re, args.join(' '));
  }
});
