// A guest on a `lockstep pair`: the served disk as a block device (nbdfuse + a loop device),
// ext4 made with mkfs's default options (it discards the whole disk first), a workload of
// fsync'd files and a sqlite database, checkpoints, and then a failure: the primary killed at
// several moments, the secondary killed. On the disk that survives: e2fsck clean after the
// journal replay, and every file whose data and directory fsync returned before the last
// checkpoint began reads back byte for byte; the database passes its integrity check and
// holds every transaction committed before that checkpoint. A client with QEMU's NBD
// reconnect (qemu-io, reconnect-delay) carries on across a failover without an error.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { tempDir } from '../helpers/graph.js';
import { requireTool } from '../helpers/processes.js';
import type { PairSupervisor } from '../../src/pair/supervisor.js';
import { GuestDisk, Workload, canMakeGuest, checkRecovered, guestOnNewPair, guestPair, guestUri as uri } from '../helpers/guest.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;

const usable = canMakeGuest();
const skip = usable ? false : 'needs root, /dev/fuse, loop devices, nbdfuse, e2fsprogs and sqlite3';


interface Running {
  sup: PairSupervisor;
  guest: GuestDisk;
  work: Workload;
  /** start time of each checkpoint that succeeded */
  checkpoints: number[];
}

/** A protected pair with ext4 made by a default mkfs, mounted, a first checkpoint, the workload running. */
async function guestOnPair(t: { after(fn: () => unknown): void }, root: string): Promise<Running> {
  const { sup, guest, work } = await guestOnNewPair(t, root, SIZE);
  const checkpoints: number[] = [];
  const t0 = performance.now();
  await sup.checkpoint();
  checkpoints.push(t0);
  work.start();
  return { sup, guest, work, checkpoints };
}

async function checkpointsFor(r: Running, n: number, gapMs: number): Promise<void> {
  for (let i = 0; i < n; i++) {
    await new Promise((res) => setTimeout(res, gapMs));
    const t0 = performance.now();
    await r.sup.checkpoint();
    r.checkpoints.push(t0);
  }
}

/** Kills the primary at `moment`, waits for the failover, and checks the recovered disk. */
async function primaryKilled(t: { after(fn: () => unknown): void }, moment: 'between-checkpoints' | 'during-checkpoint'): Promise<void> {
  const root = tempDir(t, 'lockstep-guest-');
  const r = await guestOnPair(t, root);
  await checkpointsFor(r, 3, 150);
  // on a loaded machine (each fsync waits for a checkpoint) the guest may not have fsync'd a
  // file yet: more checkpoints until one covers a file, so that the check below checks something
  for (let i = 0; r.work.durableBefore(r.checkpoints[r.checkpoints.length - 1]!).files.length === 0; i++) {
    assert.ok(i < 100 && r.work.errors === 0, `no file was fsync'd: ${r.work.firstError}`);
    await checkpointsFor(r, 1, 100);
  }
  const failedOver = new Promise((res) => r.sup.once('failed-over', res));
  if (moment === 'during-checkpoint') {
    const t0 = performance.now();
    // the hold is on its way or in place: whether this checkpoint happened or not, everything
    // before the last confirmed one must be there
    const cp = r.sup.checkpoint().then(() => r.checkpoints.push(t0), () => {});
    await new Promise((res) => setTimeout(res, 5));
    r.sup.crashPrimary();
    await cp;
  } else {
    await new Promise((res) => setTimeout(res, 120));
    r.sup.crashPrimary();
  }
  await failedOver;
  // the guest died with its host: nothing may wait on the dead primary
  await r.guest.detach(true);
  await r.work.stop();
  const want = r.work.durableBefore(r.checkpoints[r.checkpoints.length - 1]!);
  assert.ok(want.files.length > 0, `no file was fsync'd before the last checkpoint (${r.work.files.size} in all; ${r.work.firstError})`);
  await checkRecovered(join(root, 'after'), uri(join(root, 'pair')), want);
}

test('guest ext4 + sqlite: the primary killed between checkpoints', { skip }, async (t) => {
  await primaryKilled(t, 'between-checkpoints');
});

test('guest ext4 + sqlite: the primary killed while a checkpoint is being taken', { skip }, async (t) => {
  await primaryKilled(t, 'during-checkpoint');
});

test('guest ext4 + sqlite: the secondary killed, the primary keeps serving', { skip }, async (t) => {
  const root = tempDir(t, 'lockstep-guest-');
  const r = await guestOnPair(t, root);
  await checkpointsFor(r, 2, 150);
  const degraded = new Promise((res) => r.sup.once('degraded', res));
  process.kill(r.sup.pids().secondary!, 'SIGKILL');
  await degraded;
  await new Promise((res) => setTimeout(res, 300));
  await r.work.stop();
  assert.equal(r.work.errors, 0, `the guest saw no error: ${r.work.firstError}`);
  assert.equal(r.sup.stage, 'degraded');
  // a clean shutdown of the guest, then the disk the primary serves
  await r.guest.umount();
  await r.guest.detach();
  await checkRecovered(join(root, 'after'), uri(join(root, 'pair')), r.work.durableBefore(Infinity));
});

test('a client with NBD reconnect (qemu-io, reconnect-delay) carries on across a failover', { skip: skip || (requireTool('qemu-io') ? false : 'needs qemu-io') }, async (t) => {
  const root = tempDir(t, 'lockstep-guest-');
  const dir = join(root, 'pair');
  // qemu-io flushes after its writes: with output commit each flush would start a checkpoint
  // covering the write, and the post-checkpoint write this scenario drops would be kept
  // (rightly: it was acknowledged by a flush); test/pair/output-commit.test.ts covers that
  const sup = guestPair(dir, SIZE, false);
  t.after(() => sup.stop());
  await sup.start();
  const io = spawn('qemu-io', ['--image-opts', `driver=nbd,server.type=unix,server.path=${join(dir, 'disk.sock')},export=disk,reconnect-delay=20`], {
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  t.after(() => io.kill('SIGKILL'));
  let out = '';
  io.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  io.stderr!.on('data', (d: Buffer) => (out += d.toString()));
  const exited = new Promise<number | null>((res) => io.once('exit', (code) => res(code)));
  const done = () => (out.match(/\b(wrote|read) \d+\/\d+ bytes/g) ?? []).length;
  /** Sends one qemu-io command and waits for its result line. */
  const cmd = async (line: string): Promise<void> => {
    const before = done();
    io.stdin!.write(`${line}\n`);
    for (let i = 0; done() === before; i++) {
      assert.doesNotMatch(out, /failed|error|Error/, `qemu-io: ${out}`);
      if (i > 1200) throw new Error(`qemu-io did not answer '${line}': ${out}`);
      await new Promise((res) => setTimeout(res, 25));
    }
  };
  await cmd('write -P 0x11 0 64k');
  await sup.checkpoint();
  await cmd('write -P 0x22 1M 64k'); // after the last checkpoint: the failover drops it
  const failedOver = new Promise((res) => sup.once('failed-over', res));
  sup.crashPrimary();
  // sent while the primary is dead and the secondary not yet serving: held, then reconnected
  await cmd('write -P 0x33 2M 64k');
  await failedOver;
  await cmd('read -P 0x11 0 64k');
  await cmd('read -P 0x00 1M 64k');
  await cmd('read -P 0x33 2M 64k');
  io.stdin!.end('quit\n');
  assert.equal(await exited, 0, out);
  assert.doesNotMatch(out, /failed|error|Error|verification/, out);
  assert.equal((out.match(/\bwrote \d+\/\d+ bytes/g) ?? []).length, 3, out);
  assert.equal((out.match(/\bread \d+\/\d+ bytes/g) ?? []).length, 3, out);
});
