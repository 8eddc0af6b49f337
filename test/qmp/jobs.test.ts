// Block jobs driven over QMP against `./bin/lockstep daemon`: backup, mirror, the verbs,
// manual finalize/dismiss, events, and the data checked through HMP qemu-io.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from '../helpers/graph.js';
import { buildHas, startDaemon } from '../helpers/daemon.js';
import type { QmpClient } from '../../src/qmp/client.js';

const SIZE = 4 * 1024 * 1024;

function rawNode(name: string, file: string): string {
  return `driver=raw,node-name=${name},file.driver=file,file.filename=${file}`;
}

async function hmp(c: QmpClient, line: string): Promise<string> {
  return (await c.execute('human-monitor-command', { 'command-line': line })) as string;
}

async function statuses(c: QmpClient, id: string, until: string): Promise<string[]> {
  const seen: string[] = [];
  for (;;) {
    const ev = await c.waitEvent('JOB_STATUS_CHANGE', (d) => d.id === id);
    seen.push(String(ev.data!.status));
    if (ev.data!.status === until) return seen;
  }
}

test('block jobs over QMP', async (t) => {
  const dir = tempDir(t);
  const files: Record<string, string> = {};
  for (const [name, byte] of [
    ['src', 0x5a],
    ['t1', 0],
    ['t2', 0],
    ['t3', 0],
    ['t4', 0],
  ] as const) {
    files[name] = join(dir, `${name}.raw`);
    writeFileSync(files[name]!, Buffer.alloc(SIZE, byte));
  }
  const d = await startDaemon(t, dir, Object.keys(files).flatMap((n) => ['--blockdev', rawNode(n, files[n]!)]));
  const c = await d.client();
  if (!(await buildHas(c, 'jobs', dir)) || !(await buildHas(c, 'qemu-io', dir))) {
    t.skip('block jobs or the qemu-io engine are not wired into this build (src/daemon/wiring.ts)');
    return;
  }

  await t.test('blockdev-backup sync=full copies everything and reports QEMU events', async () => {
    await c.execute('blockdev-backup', { 'job-id': 'b1', device: 'src', target: 't1', sync: 'full' });
    const done = await c.waitEvent('BLOCK_JOB_COMPLETED', (x) => x.device === 'b1');
    assert.deepEqual(done.data, { device: 'b1', len: SIZE, offset: SIZE, speed: 0, type: 'backup' });
    assert.deepEqual(await statuses(c, 'b1', 'null'), ['created', 'running', 'waiting', 'pending', 'concluded', 'null']);
    assert.deepEqual(await c.execute('query-jobs'), []);
    assert.ok(readFileSync(files.t1!).equals(Buffer.alloc(SIZE, 0x5a)));
    assert.equal(
      await hmp(c, `qemu-io t1 "read -q -P 0x5a 0 ${SIZE}"`),
      '',
    );
  });

  await t.test('blockdev-mirror reaches READY, block-job-complete finishes it', async () => {
    await c.execute('blockdev-mirror', { 'job-id': 'm1', device: 'src', target: 't2', sync: 'full' });
    const ready = await c.waitEvent('BLOCK_JOB_READY', (x) => x.device === 'm1');
    assert.deepEqual(ready.data, { device: 'm1', len: SIZE, offset: SIZE, speed: 0, type: 'mirror' });
    const jobs = (await c.execute('query-block-jobs')) as Array<Record<string, unknown>>;
    assert.equal(jobs.length, 1);
    assert.equal(jobs[0]!.device, 'm1');
    assert.equal(jobs[0]!.type, 'mirror');
    assert.equal(jobs[0]!.ready, true);
    assert.equal(jobs[0]!.status, 'ready');
    await c.execute('block-job-complete', { device: 'm1' });
    const done = await c.waitEvent('BLOCK_JOB_COMPLETED', (x) => x.device === 'm1');
    assert.equal(done.data!.type, 'mirror');
    assert.ok(readFileSync(files.t2!).equals(Buffer.alloc(SIZE, 0x5a)));
  });

  await t.test('a READY mirror: pause (standby), resume, set-speed, then cancel leaves the target in sync', async () => {
    await c.execute('blockdev-mirror', { 'job-id': 'sync', device: 'src', target: 't3', sync: 'full' });
    await c.waitEvent('BLOCK_JOB_READY', (x) => x.device === 'sync');
    await c.execute('block-job-pause', { device: 'sync' });
    await c.waitEvent('JOB_STATUS_CHANGE', (x) => x.id === 'sync' && x.status === 'standby');
    let jobs = (await c.execute('query-block-jobs')) as Array<Record<string, unknown>>;
    assert.equal(jobs[0]!.paused, true);
    assert.equal(jobs[0]!.status, 'standby');
    await c.execute('block-job-resume', { device: 'sync' });
    await c.waitEvent('JOB_STATUS_CHANGE', (x) => x.id === 'sync' && x.status === 'ready');
    await c.execute('block-job-set-speed', { device: 'sync', speed: 1048576 });
    jobs = (await c.execute('query-block-jobs')) as Array<Record<string, unknown>>;
    assert.equal(jobs[0]!.speed, 1048576);
    await assert.rejects(c.execute('block-job-set-speed', { device: 'sync', speed: -1 }), { desc: "Parameter 'speed' expects a non-negative value" });
    // writes through HMP qemu-io on the source while the mirror runs reach the target
    assert.equal(await hmp(c, 'qemu-io src "write -q -P 0x77 65536 4096"'), '');
    await c.execute('block-job-cancel', { device: 'sync' });
    // cancelling a READY mirror is a completion (QEMU): the target equals the source
    const ev = await c.waitEvent('BLOCK_JOB_COMPLETED', (x) => x.device === 'sync');
    assert.equal(ev.data!.type, 'mirror');
    const expected = Buffer.alloc(SIZE, 0x5a);
    expected.fill(0x77, 65536, 65536 + 4096);
    assert.ok(readFileSync(files.t3!).equals(expected));
    assert.ok(readFileSync(files.src!).equals(expected));
  });

  await t.test('auto-finalize=off and auto-dismiss=off leave the job for job-finalize and job-dismiss', async () => {
    await c.execute('blockdev-backup', { 'job-id': 'manual', device: 'src', target: 't4', sync: 'full', 'auto-finalize': false, 'auto-dismiss': false });
    await c.waitEvent('JOB_STATUS_CHANGE', (x) => x.id === 'manual' && x.status === 'pending');
    assert.deepEqual(
      ((await c.execute('query-jobs')) as Array<Record<string, unknown>>).map((j) => [j.id, j.status]),
      [['manual', 'pending']],
    );
    await assert.rejects(c.execute('job-dismiss', { id: 'manual' }), { desc: "Job 'manual' in state 'pending' cannot accept command verb 'dismiss'" });
    await c.execute('job-finalize', { id: 'manual' });
    await c.waitEvent('JOB_STATUS_CHANGE', (x) => x.id === 'manual' && x.status === 'concluded');
    await c.execute('job-dismiss', { id: 'manual' });
    await c.waitEvent('JOB_STATUS_CHANGE', (x) => x.id === 'manual' && x.status === 'null');
    assert.deepEqual(await c.execute('query-jobs'), []);
    assert.ok(readFileSync(files.t4!).equals(readFileSync(files.src!)));
  });

  await t.test('unknown jobs answer as QEMU does', async () => {
    await assert.rejects(c.execute('block-job-cancel', { device: 'nope' }), { errorClass: 'DeviceNotActive', desc: "Block job 'nope' not found" });
    await assert.rejects(c.execute('job-dismiss', { id: 'nope' }), { errorClass: 'GenericError', desc: 'Job not found' });
  });
});
