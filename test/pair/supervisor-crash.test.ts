// The supervisor itself SIGKILLed and restarted (issue 15 item 10, issue 13's supervisor
// crash tests). `lockstep pair` runs as a child process here (bin/lockstep), so that it can be
// killed as a user's would be: its daemons must keep serving, the client's NBD connection must
// survive, and the restarted supervisor must adopt them (or, during the initial sync, start
// the copy again) without losing a byte the client had acknowledged and without copying an
// older disk over a newer one.

import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from '../helpers/graph.js';
import { LOCKSTEP_BIN } from '../helpers/processes.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import { QmpClient } from '../../src/qmp/client.js';
import { controlRequest } from '../../src/pair/control.js';
import { pidAlive, readDaemons, type DaemonsRecord } from '../../src/pair/adopt.js';

const run = promisify(execFile);
const MiB = 1024 * 1024;
const BLOCK = 64 * 1024;

/** A `lockstep pair` process and what it printed. */
class Supervisor {
  out = '';
  readonly exited: Promise<number | null>;
  private constructor(readonly child: ChildProcess) {
    child.stdout!.on('data', (d: Buffer) => (this.out += d.toString()));
    child.stderr!.on('data', (d: Buffer) => (this.out += d.toString()));
    this.exited = new Promise((r) => child.once('exit', (c) => r(c)));
  }

  /** group: in a process group of its own, as under a terminal (see hangUp) */
  static start(t: TestContext, dir: string, extra: string[] = [], group = false): Supervisor {
    const child = spawn(
      process.execPath,
      // a loaded machine must not fail a side over by itself: liveness is not what this checks
      [LOCKSTEP_BIN, 'pair', 'run', '--data-dir', dir, '--size', '64M', '--nbd-port', '0', '--checkpoint-interval', '0.2',
        '--heartbeat-timeout', '3s', '--log-format', 'json', ...extra],
      { stdio: ['ignore', 'pipe', 'pipe'], detached: group },
    );
    const s = new Supervisor(child);
    t.after(() => s.kill());
    return s;
  }

  /** Waits until the output matches; fails with the output when the process exits first. */
  async waitFor(re: RegExp, ms = 60_000): Promise<RegExpMatchArray> {
    for (const t0 = Date.now(); ; ) {
      const m = this.out.match(re);
      if (m) return m;
      assert.ok(this.child.exitCode === null && this.child.signalCode === null, `the supervisor exited before ${re}: ${this.out}`);
      assert.ok(Date.now() - t0 < ms, `no ${re} within ${ms} ms: ${this.out}`);
      await sleep(20);
    }
  }

  /** The terminal closed: SIGHUP to the supervisor's whole process group (it dies of it, and so
   *  would every daemon still in its group). */
  async hangUp(): Promise<void> {
    process.kill(-this.child.pid!, 'SIGHUP');
    await this.exited;
  }

  async kill(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill(signal);
    await this.exited;
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function record(dir: string): DaemonsRecord {
  const r = readDaemons(dir);
  assert.ok(r, `no daemons record in ${dir}`);
  return r;
}

/** A data directory whose leftovers (every supervisor, then every daemon its record named)
 *  are killed before it is removed: registered first, so that it runs first. */
function pairDir(t: TestContext): string {
  const pids = new Set<number>();
  let dir = '';
  t.after(() => {
    const r = readDaemons(dir);
    for (const e of [r?.primary, r?.secondary]) if (e) pids.add(e.pid);
    for (const pid of pids) if (pidAlive(pid)) process.kill(pid, 'SIGKILL');
  });
  dir = tempDir(t, 'lockstep-supcrash-');
  // a daemon that a failed test leaves behind may have left the record already
  const timer = setInterval(() => {
    const r = readDaemons(dir);
    for (const e of [r?.primary, r?.secondary]) if (e) pids.add(e.pid);
  }, 200);
  t.after(() => clearInterval(timer));
  return dir;
}

/** An NBD disconnect that gives up: a stalled server must not hang the test's clean-up. */
function closeClient(c: NbdClient): Promise<unknown> {
  return Promise.race([c.disconnect().catch(() => {}), sleep(2000)]);
}

async function status(dir: string): Promise<{ stage: string; checkpoints: number; sync?: { kind: string; source?: string } | null }> {
  const r = await controlRequest(join(dir, 'pair.sock'), 'status', 10_000);
  assert.ok(r.ok, r.error);
  return r.result as { stage: string; checkpoints: number };
}

async function waitStage(dir: string, stage: string, ms = 60_000): Promise<void> {
  let last = '';
  for (const t0 = Date.now(); Date.now() - t0 < ms; await sleep(50)) {
    last = (await status(dir).catch(() => ({ stage: 'unreachable' }))).stage;
    if (last === stage) return;
  }
  assert.fail(`the pair did not reach ${stage} within ${ms} ms (last: ${last})`);
}

function connect(dir: string): Promise<NbdClient> {
  return NbdClient.connect({ address: { type: 'unix', path: join(dir, 'disk.sock') }, exportName: 'disk' });
}

/** What the client wrote and had acknowledged (a flush completed after the write). */
class Acked {
  readonly blocks = new Map<number, Buffer>();
  async write(c: NbdClient, index: number): Promise<void> {
    const data = randomBytes(BLOCK);
    await c.write(index * BLOCK, data);
    await c.flush();
    this.blocks.set(index, data);
  }
  async check(c: NbdClient, what: string): Promise<void> {
    for (const [i, data] of this.blocks) {
      const got = await c.read(i * BLOCK, BLOCK);
      assert.ok(got.equals(data), `${what}: block ${i} (offset ${i * BLOCK}) is not what the client had acknowledged`);
    }
  }
}

/** The two disk files hold the same guest bytes. */
async function assertDisksIdentical(dir: string): Promise<void> {
  const { stdout } = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', join(dir, 'primary.qcow2'), join(dir, 'secondary.qcow2')]);
  assert.match(stdout, /Images are identical/);
}

test('supervisor SIGKILLed under client writes: the daemons keep serving, a restart adopts them, no acknowledged write is lost', { timeout: 240_000 }, async (t) => {
  const dir = pairDir(t);
  const first = Supervisor.start(t, dir);
  await first.waitFor(/lockstep pair is running/);
  const before = record(dir);
  assert.equal(before.stage, 'protected');
  assert.equal(before.supervisor, first.child.pid);
  const { primary: p, secondary: s } = before;
  assert.ok(p && s);

  const acked = new Acked();
  const c = await connect(dir);
  t.after(() => closeClient(c));
  let next = 0;
  let stop = false;
  let writerError: unknown = null;
  const writer = (async () => {
    while (!stop) await acked.write(c, next++ % 512);
  })().catch((e: unknown) => (writerError = e));
  while (acked.blocks.size < 8 && writerError === null) await sleep(20);

  await first.kill('SIGKILL');
  // as if it died inside a checkpoint's barrier: the guest's writes held on the primary
  const q = await QmpClient.open({ type: 'unix', path: p.qmp });
  await q.execute('block-io-hold', { 'node-name': 'colo-disk0' }).catch((e: unknown) => assert.match(String(e), /already held/));
  q.close();
  // the daemons were not killed with it, and serve on
  assert.ok(pidAlive(p.pid) && pidAlive(s.pid), 'a daemon died with its supervisor');
  const n0 = acked.blocks.size;
  // no supervisor renews the primary's lease: writes stall (by design) but never fail
  await sleep(4000);
  assert.equal(writerError, null);
  assert.ok(pidAlive(p.pid) && pidAlive(s.pid));
  assert.ok(existsSync(join(dir, 'pair.sock')), 'the dead supervisor left its control socket');

  const second = Supervisor.start(t, dir);
  await second.waitFor(new RegExp(`adopted the running primary \\(pid ${p.pid}\\) and secondary \\(pid ${s.pid}\\); took a checkpoint`));
  assert.match(second.out, /removed a stale control socket/);
  assert.match(second.out, /released the I\/O hold the dead supervisor left on the primary/);
  const after = record(dir);
  assert.equal(after.supervisor, second.child.pid);
  assert.equal(after.primary?.pid, p.pid);
  // the same connection goes on: writes complete again once the adopted lease is renewed
  while (acked.blocks.size < n0 + 8 && writerError === null) await sleep(20);
  stop = true;
  await writer;
  assert.equal(writerError, null, `the client's connection did not survive: ${String(writerError)}`);
  const st = await status(dir);
  assert.equal(st.stage, 'protected');
  const cps = st.checkpoints;
  for (let i = 0; i < 100 && (await status(dir)).checkpoints < cps + 3; i++) await sleep(100);
  assert.ok((await status(dir)).checkpoints >= cps + 3, 'the adopted pair takes checkpoints on its interval');

  // a third supervisor while the second runs is refused, and changes nothing
  const third = Supervisor.start(t, dir);
  assert.equal(await third.exited, 1);
  assert.match(third.out, /another lockstep pair supervisor answers on .*pair\.sock/);
  assert.equal(record(dir).supervisor, second.child.pid);

  // the adopted pair fails over as before: every acknowledged block is on the survivor
  await c.disconnect();
  process.kill(p.pid, 'SIGKILL');
  await waitStage(dir, 'failed-over');
  const r = await connect(dir);
  try {
    await acked.check(r, 'after the failover of the adopted pair');
  } finally {
    await r.disconnect();
  }
  await second.kill('SIGINT');
  assert.ok(!pidAlive(s.pid), 'a clean stop ends the adopted survivor');
  assert.equal(readDaemons(dir), null, 'a clean stop removes the daemons record');
  assert.ok(!existsSync(join(dir, 'pair.sock')), 'a clean stop removes its control socket');
});

test('supervisor SIGKILLed after a failover: the survivor keeps its clients, is adopted, and a later start copies it, never the old primary, back', { timeout: 240_000 }, async (t) => {
  const dir = pairDir(t);
  const first = Supervisor.start(t, dir, [], true);
  await first.waitFor(/lockstep pair is running/);
  const { primary: p, secondary: s } = record(dir);
  assert.ok(p && s);
  const acked = new Acked();
  let c = await connect(dir);
  for (let i = 0; i < 4; i++) await acked.write(c, i);
  await c.disconnect();
  process.kill(p.pid, 'SIGKILL');
  await waitStage(dir, 'failed-over');
  assert.equal(record(dir).stage, 'failed-over');
  assert.equal(record(dir).primary, null);

  c = await connect(dir);
  t.after(() => closeClient(c));
  for (let i = 2; i < 8; i++) await acked.write(c, i); // 2 and 3 rewritten on the survivor
  // this time the supervisor's terminal goes away: the survivor is in a session of its own
  await first.hangUp();
  assert.ok(pidAlive(s.pid), 'the survivor died with its supervisor');
  // no lease holds the survivor's writes: the same connection writes on at once
  for (let i = 8; i < 12; i++) await acked.write(c, i);

  const second = Supervisor.start(t, dir);
  await second.waitFor(new RegExp(`adopted the running survivor \\(pid ${s.pid}\\), which serves the disk`));
  await waitStage(dir, 'failed-over');
  for (let i = 12; i < 16; i++) await acked.write(c, i);
  await acked.check(c, 'on the adopted survivor');
  await c.disconnect();
  await second.kill('SIGINT');
  assert.ok(!pidAlive(s.pid));

  // the next start: the survivor's disk is newer; it is copied onto the old primary's
  const third = Supervisor.start(t, dir);
  await third.waitFor(/lockstep pair is running/);
  assert.match(third.out, /disks compared: incremental sync from the secondary disk/);
  const r = await connect(dir);
  try {
    await acked.check(r, 'after the restart');
  } finally {
    await r.disconnect();
  }
  await third.kill('SIGINT');
  await assertDisksIdentical(dir);
});

test('supervisor SIGKILLed after a failover\'s re-protection: the restart adopts the daemons with the roles swapped, and a failover goes back to the old primary\'s disk', { timeout: 240_000 }, async (t) => {
  const dir = pairDir(t);
  const first = Supervisor.start(t, dir);
  await first.waitFor(/lockstep pair is running/);
  const { primary: p, secondary: s } = record(dir);
  assert.ok(p && s);
  const acked = new Acked();
  let c = await connect(dir);
  for (let i = 0; i < 4; i++) await acked.write(c, i);
  await c.disconnect();
  process.kill(p.pid, 'SIGKILL');
  await waitStage(dir, 'failed-over');

  c = await connect(dir);
  t.after(() => closeClient(c));
  for (let i = 2; i < 8; i++) await acked.write(c, i);
  const rp = await controlRequest(join(dir, 'pair.sock'), 'reprotect', 120_000);
  assert.ok(rp.ok, rp.error);
  await waitStage(dir, 'protected');
  const swapped = record(dir);
  assert.equal(swapped['primary-side'], 'secondary');
  assert.equal(swapped.secondary?.pid, s.pid, 'the survivor is recorded as the daemon started as secondary');
  assert.ok(swapped.primary && swapped.primary.pid !== p.pid && pidAlive(swapped.primary.pid));
  // the same connection writes on, replicated to the old primary's disk
  for (let i = 8; i < 12; i++) await acked.write(c, i);
  await first.kill('SIGKILL');
  assert.ok(pidAlive(s.pid) && pidAlive(swapped.primary.pid), 'the daemons died with their supervisor');

  const second = Supervisor.start(t, dir);
  await second.waitFor(new RegExp(`adopted the running primary \\(pid ${s.pid}\\) and secondary \\(pid ${swapped.primary.pid}\\)`));
  await waitStage(dir, 'protected');
  const st = (await controlRequest(join(dir, 'pair.sock'), 'status', 10_000)).result as { 'primary-side'?: string; sides?: Record<string, { role: string }> };
  assert.equal(st['primary-side'], 'secondary');
  assert.equal(st.sides?.secondary?.role, 'Primary');
  for (let i = 12; i < 16; i++) await acked.write(c, i);
  await acked.check(c, 'on the adopted new primary');
  await closeClient(c);

  // the new primary dies: the adopted pair fails over to the old primary's disk, which holds
  // every acknowledged write (a flush completes once a checkpoint covers it)
  process.kill(s.pid, 'SIGKILL');
  await waitStage(dir, 'failed-over');
  const r = await connect(dir);
  try {
    await acked.check(r, 'after failing back to the old primary\'s disk');
  } finally {
    await r.disconnect();
  }
  await second.kill('SIGINT');
});

/** Waits for the running sync job on the primary and slows it down, so that it is still running when the supervisor dies. */
async function slowDownSync(dir: string): Promise<void> {
  const q = await QmpClient.open({ type: 'unix', path: join(dir, 'primary.qmp') });
  try {
    for (const t0 = Date.now(); Date.now() - t0 < 60_000; await sleep(5)) {
      const jobs = (await q.execute('query-block-jobs')) as Array<{ device: string; offset: number; len: number }>;
      const j = jobs.find((x) => x.device === 'lockstep-sync');
      if (j) {
        assert.ok(j.offset < j.len, 'the sync finished before the test could slow it down');
        await q.execute('block-job-set-speed', { device: 'lockstep-sync', speed: 2 * MiB });
        return;
      }
    }
    assert.fail('no sync job started');
  } finally {
    q.close();
  }
}

test('supervisor SIGKILLed during the initial sync: the restart stops the half-set-up daemons and copies again, from the same side', { timeout: 240_000 }, async (t) => {
  const dir = pairDir(t);
  // a pair with 16 MiB of data on its disks, then a new (empty) secondary disk
  const setup = Supervisor.start(t, dir);
  await setup.waitFor(/lockstep pair is running/);
  const data = randomBytes(8 * MiB);
  let c = await connect(dir);
  for (let off = 0; off < data.length; off += MiB) await c.write(off, data.subarray(off, off + MiB));
  await c.flush();
  await c.disconnect();
  await setup.kill('SIGINT');
  for (const f of ['secondary.qcow2', 'secondary.qcow2.meta.json', 'secondary.qcow2.dirty']) rmSync(join(dir, f), { force: true });

  const first = Supervisor.start(t, dir);
  await first.waitFor(/disks compared: full sync from the primary disk/);
  await slowDownSync(dir);
  const during = record(dir);
  assert.equal(during.stage, 'syncing');
  await first.kill('SIGKILL');
  assert.ok(during.primary && pidAlive(during.primary.pid), 'the primary died with its supervisor');
  const target = JSON.parse(readFileSync(join(dir, 'secondary.qcow2.meta.json'), 'utf8')) as { consistent: boolean };
  assert.equal(target.consistent, false, 'the copy target is marked inconsistent while it is copied to');

  const second = Supervisor.start(t, dir);
  await second.waitFor(/lockstep pair is running/);
  assert.match(second.out, /the last run ended in stage syncing, before it served the disk: stopping the primary daemon/);
  // the half-copied disk is never a source: the copy starts again from the primary
  assert.match(second.out, /disks compared: full sync from the primary disk/);
  assert.ok(!pidAlive(during.primary!.pid) && !pidAlive(during.secondary!.pid), 'the old daemons were stopped');
  c = await connect(dir);
  try {
    const got = await c.read(0, data.length);
    assert.ok(got.equals(data), 'the disk lost data across the interrupted sync');
  } finally {
    await c.disconnect();
  }
  await second.kill('SIGINT');
  await assertDisksIdentical(dir);
  const meta = JSON.parse(readFileSync(join(dir, 'secondary.qcow2.meta.json'), 'utf8')) as { consistent: boolean };
  assert.equal(meta.consistent, true);
});

test('a record whose daemon does not match is refused, naming the pid, and changes nothing', { timeout: 120_000 }, async (t) => {
  const dir = pairDir(t);
  // a lockstep daemon on the recorded socket, but not set up as a pair's primary
  const sock = join(dir, 'primary.qmp');
  const d = spawn(process.execPath, [LOCKSTEP_BIN, 'daemon', '--chardev', `socket,id=mon0,path=${sock},server=on,wait=off`, '--monitor', 'chardev=mon0'], { stdio: 'ignore' });
  const gone = new Promise((r) => d.once('exit', r));
  t.after(async () => {
    d.kill('SIGKILL');
    await gone;
  });
  for (let i = 0; !existsSync(sock); i++) {
    assert.ok(i < 400, 'the daemon did not start');
    await sleep(25);
  }
  const rec = { format: 'lockstep-pair-daemons', version: 1, supervisor: 999_999_999, stage: 'protected', primary: { pid: d.pid, qmp: sock, log: join(dir, 'p.log') }, secondary: null, generation: { primary: null, secondary: null }, serving: [], updated: '' };
  const { writeFileSync } = await import('node:fs');
  writeFileSync(join(dir, 'pair-daemons.json'), JSON.stringify(rec));
  const sup = Supervisor.start(t, dir);
  assert.equal(await sup.exited, 1);
  assert.match(sup.out, new RegExp(`the primary daemon \\(pid ${d.pid}\\) does not have the protected pair's layout .*kill ${d.pid}`));
  assert.ok(pidAlive(d.pid!), 'the refused start killed the daemon');
  assert.ok(existsSync(join(dir, 'pair-daemons.json')), 'the refused start removed the record');
  assert.ok(!existsSync(join(dir, 'primary.qcow2')), 'the refused start created images');
});
