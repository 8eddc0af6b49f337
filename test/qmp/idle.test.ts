// The monitor's idle timeout (--x-monitor-idle-timeout): with all 64 monitor connections
// taken, a newcomer replaces the client idle longest once it has idled past the timeout; a
// client waiting for a command reply is never chosen.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { connect, createServer, type Socket } from 'node:net';
import { join } from 'node:path';
import { tempDir } from '../helpers/graph.js';
import { startDaemon } from '../helpers/daemon.js';
import { QmpClient, QmpCommandError } from '../../src/qmp/client.js';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** A raw monitor connection that resolves once the greeting arrived (the daemon took it). */
function idleClient(path: string): Promise<{ socket: Socket; closed: Promise<void> }> {
  return new Promise((resolve, reject) => {
    const socket = connect(path);
    const closed = new Promise<void>((r) => socket.once('close', () => r()));
    socket.once('error', reject);
    socket.once('data', () => resolve({ socket, closed }));
    socket.once('close', () => reject(new Error('refused before the greeting')));
  });
}

test('monitor at its cap: the longest idle client makes room, a client waiting for a reply is kept', async (t) => {
  const dir = tempDir(t);
  // an NBD "server" that accepts and never answers: blockdev-add on it waits for its reply
  const silent: Socket[] = [];
  const gotConnection = new Promise<void>((r) => {
    const fake = createServer((s) => {
      silent.push(s);
      r();
    });
    fake.listen(join(dir, 'silent.sock'));
    t.after(() => {
      for (const s of silent) s.destroy();
      fake.close();
    });
  });
  const d = await startDaemon(t, dir, ['--x-monitor-idle-timeout', '0.2']);

  const busy = await d.client();
  const pending = busy.execute('blockdev-add', { driver: 'nbd', 'node-name': 'n0', export: 'x', server: { type: 'unix', path: join(dir, 'silent.sock') } });
  pending.catch(() => {});
  await gotConnection; // busy's command is running, its reply outstanding

  const idle: Array<{ socket: Socket; closed: Promise<void> }> = [];
  t.after(() => idle.forEach((c) => c.socket.destroy()));
  for (let i = 0; i < 63; i++) idle.push(await idleClient(d.qmpPath)); // 64 with busy: the cap
  let othersClosed = 0;
  for (const c of idle.slice(1)) void c.closed.then(() => othersClosed++);

  await sleep(300); // everyone has idled past 0.2 s; busy has been silent the longest
  const newcomer = await QmpClient.open({ type: 'unix', path: d.qmpPath });
  t.after(() => newcomer.close());
  // the oldest idle connection is closed for the newcomer, not busy (whose reply is pending)
  const first = await Promise.race([idle[0]!.closed.then(() => 'oldest idle closed'), pending.then(() => 'busy answered', () => 'busy dropped')]);
  assert.equal(first, 'oldest idle closed');
  assert.deepEqual((await newcomer.execute('query-status')) as unknown, { status: 'running', singlestep: false, running: true });
  assert.equal(othersClosed, 0, 'only one idle client was closed');

  // busy is still connected and gets its reply once the silent server hangs up
  for (const s of silent) s.destroy();
  await assert.rejects(pending, (e: unknown) => e instanceof QmpCommandError);
  assert.ok(!busy.closed);
  assert.deepEqual((await busy.execute('query-status')) as unknown, { status: 'running', singlestep: false, running: true });
});

test('--x-monitor-idle-timeout: a value that is not a non-negative number is refused', async () => {
  const { parseDaemonArgs } = await import('../../src/daemon/options.js');
  assert.throws(() => parseDaemonArgs(['--x-monitor-idle-timeout', '-1']), /--x-monitor-idle-timeout: '-1' is not a non-negative number of seconds/);
  assert.throws(() => parseDaemonArgs(['--x-monitor-idle-timeout', 'soon']), /is not a non-negative number of seconds/);
  assert.equal(parseDaemonArgs(['--x-monitor-idle-timeout', '0']).monitorIdleTimeout, 0);
});
