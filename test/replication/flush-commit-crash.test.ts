// Output commit across a crash (issue 16), on real daemons built as `lockstep pair` builds
// them (src/pair/setup.ts) and driven over QMP the way a user who runs replication without
// the supervisor would: checkpoints on an interval and at once when X_BLOCK_FLUSH_PENDING
// says flushes wait, with x-block-flush-commit-release inside each barrier. A client writes
// stamped 4 KiB blocks (some FUA) and flushes, recording every acknowledgement; the primary
// is SIGKILLed at a random moment (seeded), the secondary fails over, and then:
//   - every write a flush or FUA acknowledged is on the recovered disk (or a newer one);
//   - the recovered disk equals what the primary held at a checkpoint, byte for byte (read
//     from its local disk inside the barrier): the last completed one, or the one whose
//     secondary checkpoint was under way when the primary died.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { NbdClient } from '../../src/nbd/client/client.js';
import type { QmpClient } from '../../src/qmp/client.js';
import { DISK_NODE, buildPrimary, buildSecondary, ensureImage, forwardNode } from '../../src/pair/setup.js';
import { tempDir } from '../helpers/graph.js';
import { startDaemon } from '../helpers/daemon.js';

const SIZE = 1024 * 1024;
const BLOCK = 4096;
const BLOCKS = SIZE / BLOCK;
const ROUNDS = Number(process.env.LOCKSTEP_CRASH_ROUNDS ?? 4);
const SEED = Number(process.env.LOCKSTEP_CRASH_SEED ?? 1617);
// LOCKSTEP_CRASH_NO_FLUSH_COMMIT=1 runs the same rounds without output commit: they fail
// (acknowledged flushes lost), which shows what the test can catch
const flushCommit = process.env.LOCKSTEP_CRASH_NO_FLUSH_COMMIT !== '1';

function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** A block stamped with its write's sequence number (> 0) and its index. */
function stamp(seq: number, block: number): Buffer {
  const b = Buffer.alloc(BLOCK);
  for (let i = 0; i < BLOCK; i += 8) {
    b.writeUInt32LE(seq, i);
    b.writeUInt32LE(block, i + 4);
  }
  return b;
}
const seqOf = (disk: Buffer, block: number) => disk.readUInt32LE(block * BLOCK);

async function pairOfDaemons(t: { after(fn: () => unknown): void }) {
  const root = tempDir(t, 'lockstep-flushcrash-');
  const pd = join(root, 'p');
  const sd = join(root, 's');
  mkdirSync(pd);
  mkdirSync(sd);
  const [sec, pri] = await Promise.all([startDaemon(t, sd, []), startDaemon(t, pd, [])]);
  const s = await sec.client();
  const p = await pri.client();
  const forward = { type: 'unix' as const, path: join(sd, 'fwd.sock') };
  for (const [q, dir, name] of [[s, sd, 'secondary.qcow2'], [s, sd, 'active.qcow2'], [s, sd, 'hidden.qcow2'], [p, pd, 'primary.qcow2']] as const) {
    await ensureImage(q, { dir, local: true }, name, SIZE, false);
  }
  await buildSecondary(s, { dir: sd, local: true }, forward, undefined);
  await buildPrimary(p, { dir: pd, local: true });
  // both disks are new and empty: no initial sync
  await s.execute('xen-set-replication', { enable: true, primary: false });
  await p.execute('blockdev-add', { driver: 'replication', 'node-name': 'replication0', mode: 'primary', file: forwardNode(forward, undefined, 1) });
  await p.execute('x-blockdev-change', { parent: DISK_NODE, node: 'replication0' });
  await p.execute('xen-set-replication', { enable: true, primary: true });
  if (flushCommit) await p.execute('x-block-flush-commit', { 'node-name': DISK_NODE, enable: true });
  await p.execute('nbd-server-start', { addr: { type: 'unix', data: { path: join(pd, 'nbd.sock') } } });
  await p.execute('block-export-add', { type: 'nbd', id: 'disk', 'node-name': DISK_NODE, name: 'disk', writable: true });
  // the primary's own disk, read inside each barrier: what the primary held at the checkpoint
  await p.execute('block-export-add', { type: 'nbd', id: 'local', 'node-name': 'local0', name: 'local' });
  const nbd = (name: string) => NbdClient.connect({ address: { type: 'unix', path: join(pd, 'nbd.sock') }, exportName: name });
  return { pri, p, s, sd, nbd };
}

/** The secondary fails over as the supervisor does and serves what it recovered. */
async function failover(s: QmpClient, sd: string): Promise<Buffer> {
  await s.execute('nbd-server-stop');
  await s.execute('xen-set-replication', { enable: false, primary: false, failover: true });
  for (;;) {
    const list = (await s.execute('query-replication')) as Array<{ stage: string }>;
    if (list.every((x) => x.stage === 'done')) break;
    assert.ok(!list.some((x) => x.stage === 'failover-failed'), 'the failover commit failed');
    await new Promise((r) => setTimeout(r, 10));
  }
  const sock = join(sd, 'recovered.sock');
  await s.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
  await s.execute('block-export-add', { type: 'nbd', id: 'recovered', 'node-name': 'childs0', name: 'recovered' });
  const c = await NbdClient.connect({ address: { type: 'unix', path: sock }, exportName: 'recovered' });
  try {
    return await c.read(0, SIZE);
  } finally {
    await c.disconnect();
  }
}

async function round(t: { after(fn: () => unknown): void }, r: () => number): Promise<{ flushes: number; checkpoints: number; fuas: number; writes: number }> {
  const { pri, p, s, sd, nbd } = await pairOfDaemons(t);
  const client = await nbd('disk');
  const local = await nbd('local');
  let dead = false;

  // ---- the checkpoints: on an interval and when flushes wait (group commit) ----
  const done: Buffer[] = [Buffer.alloc(SIZE)]; // checkpoint 0: both disks empty
  let underway: Buffer | null = null; // its secondary checkpoint was sent, no answer yet
  let releases = 0;
  let running: Promise<void> | null = null;
  let again = false;
  const checkpoint = async (): Promise<void> => {
    await p.execute('block-io-hold', { 'node-name': DISK_NODE });
    try {
      const held = await local.read(0, SIZE);
      underway = held;
      await s.execute('xen-colo-do-checkpoint');
      done.push(held);
      underway = null;
      if (flushCommit) releases = ((await p.execute('x-block-flush-commit-release', { 'node-name': DISK_NODE })) as { releases: number }).releases;
    } finally {
      await p.execute('block-io-release', { 'node-name': DISK_NODE });
    }
  };
  const kick = (): void => {
    if (dead) return;
    if (running) {
      again = true;
      return;
    }
    running = checkpoint()
      .catch(() => {})
      .finally(() => {
        running = null;
        if (again) {
          again = false;
          kick();
        }
      });
  };
  p.on('event', (ev: { event: string; data?: Record<string, unknown> }) => {
    // a request the last release already answered needs no new checkpoint
    if (ev.event === 'X_BLOCK_FLUSH_PENDING' && (ev.data!.releases as number) >= releases) kick();
  });
  const interval = setInterval(kick, 100 + Math.floor(r() * 200));

  // ---- the client ----
  let seq = 0;
  const acked = new Array<number>(BLOCKS).fill(0);
  const durable = new Array<number>(BLOCKS).fill(0);
  const busy = new Set<number>();
  const errors: string[] = [];
  let flushes = 0;
  let fuas = 0;
  const op = async (): Promise<void> => {
    const x = r();
    if (x < 0.2) {
      const covered = acked.slice();
      await client.flush();
      flushes++;
      covered.forEach((v, i) => (durable[i] = Math.max(durable[i]!, v)));
      return;
    }
    let block = Math.floor(r() * BLOCKS);
    while (busy.has(block)) block = (block + 1) % BLOCKS;
    busy.add(block);
    const n = ++seq;
    const fua = x < 0.3;
    try {
      await client.write(block * BLOCK, stamp(n, block), { fua });
      acked[block] = n;
      if (fua) {
        fuas++;
        durable[block] = Math.max(durable[block]!, n);
      }
    } finally {
      busy.delete(block);
    }
  };
  const worker = async (): Promise<void> => {
    while (!dead) await op().catch((e: unknown) => { if (!dead) errors.push(String(e)); });
  };
  const workers = [worker(), worker(), worker(), worker()];

  await new Promise((res) => setTimeout(res, 800 + Math.floor(r() * 1500)));
  pri.proc.kill('SIGKILL');
  dead = true;
  clearInterval(interval);
  await pri.exited;
  await Promise.all(workers);
  await running;
  client.destroy();
  local.destroy();

  const recovered = await failover(s, sd);
  const candidates = [done[done.length - 1]!, ...(underway ? [underway as Buffer] : [])];
  assert.ok(
    candidates.some((c) => c.equals(recovered)),
    `the recovered disk is not the primary's disk at the last checkpoint (${done.length - 1} done${underway ? ', one under way' : ''})`,
  );
  for (let b = 0; b < BLOCKS; b++) {
    assert.ok(seqOf(recovered, b) >= durable[b]!, `block ${b}: write ${durable[b]} was acknowledged by a flush or FUA, the recovered disk has ${seqOf(recovered, b)}`);
  }
  assert.deepEqual(errors, [], "the client saw errors before the crash");
  return { flushes, checkpoints: done.length - 1, fuas, writes: seq };
}

test(`output commit: every acknowledged flush and FUA write survives a SIGKILLed primary (seed ${SEED}, ${ROUNDS} rounds)`, { timeout: 600_000 }, async (t) => {
  const r = rng(SEED);
  let flushes = 0;
  let fuas = 0;
  for (let i = 0; i < ROUNDS; i++) {
    const res = await t.test(`round ${i}`, async (tt) => {
      const x = await round(tt, r);
      flushes += x.flushes;
      fuas += x.fuas;
      tt.diagnostic(`${x.writes} writes, ${x.flushes} flushes, ${x.fuas} FUA writes acknowledged, ${x.checkpoints} checkpoints`);
    });
    void res;
  }
  // the check is only as good as what was acknowledged: the rounds did promise something
  assert.ok(flushes + fuas > 0, `${flushes} flushes and ${fuas} FUA writes acknowledged`);
});
