// Output commit through a real filesystem (issue 16): ext4 made by a default mkfs on the disk
// `lockstep pair` serves (nbdfuse + a loop device), a sqlite database committing
// transactions and files written and fsync'd (each recorded only once sqlite or fsync
// returned), checkpoints, and the primary SIGKILLed at a seeded random moment after the
// guest was last told something is durable, over several rounds. Each transaction inserts one
// row with a known id and a payload derived from it. The recovered disk, read before anything
// mounts it, equals byte for byte what the primary's disk held at a checkpoint (the last one
// confirmed, or a later one under way: read inside each barrier, CheckpointDisks); then,
// mounted (the journal replays): e2fsck clean, `PRAGMA integrity_check` ok, every row present
// holds its exact payload, and
//   - with output commit (the default): every row sqlite acknowledged is there and every
//     fsync'd file is byte-identical, including those acknowledged after the last checkpoint
//     the test itself asked for;
//   - with `flushCommit: false`: what was acknowledged before the last checkpoint is there,
//     and acknowledged commits and files ARE lost (so the first case can fail).
// What was never acknowledged may be there or not.
// LOCKSTEP_GUEST_CRASH_ROUNDS and LOCKSTEP_GUEST_CRASH_SEED change the rounds.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { tempDir } from '../helpers/graph.js';
import { CheckpointDisks, canMakeGuest, checkRecovered, examineRecovered, guestOnNewPair, guestUri as uri, readServedDisk } from '../helpers/guest.js';
import { rng } from '../helpers/rng.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;
const ROUNDS = Number(process.env.LOCKSTEP_GUEST_CRASH_ROUNDS ?? 3);
const SEED = Number(process.env.LOCKSTEP_GUEST_CRASH_SEED ?? 1616);

const usable = canMakeGuest();
const skip = usable ? false : 'needs root, /dev/fuse, loop devices, nbdfuse, e2fsprogs and sqlite3';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface RoundResult {
  /** files and transactions the guest was told are durable */
  files: number;
  rows: number;
  /** of those, missing or different on the recovered disk */
  lostFiles: number;
  lostRows: number;
  /** the test's own checkpoints */
  checkpoints: number;
  /** barriers recorded, output commit's included */
  barriers: number;
  verified: number;
  ms: number;
}

// the test's own checkpoints only (with output commit, flushes start more)
async function round(t: { after(fn: () => unknown): void }, r: () => number, flushCommit: boolean): Promise<RoundResult> {
  const root = tempDir(t, 'lockstep-guestcrash-');
  const dir = join(root, 'pair');
  let disks!: CheckpointDisks;
  const { sup, guest, work } = await guestOnNewPair(t, root, SIZE, flushCommit, async (s) => {
    disks = await CheckpointDisks.attach(t, s, join(dir, 'disk.sock'));
  });
  // checkpoints on a seeded interval, each noted with the time it was asked for (it began
  // then or later) and the time it completed
  const checkpoints: Array<{ asked: number; done: number }> = [];
  let ticking = true;
  const ticker = (async () => {
    while (ticking) {
      const asked = performance.now();
      await sup.checkpoint();
      checkpoints.push({ asked, done: performance.now() });
      await sleep(200 + r() * 300);
    }
  })();
  await sleep(300);
  work.start();
  await sleep(600 + r() * 1200);
  ticking = false;
  await ticker;
  // a moment with something to lose: a file or transaction acknowledged after the last
  // checkpoint the test asked for completed (output commit must keep it, its own
  // checkpoints cover it), then a seeded random delay
  const last = checkpoints[checkpoints.length - 1]!;
  for (let i = 0; (work.lastAck()?.at ?? 0) <= last.done; i++) {
    assert.ok(i < 3000 && work.errors === 0, `nothing was acknowledged after the last checkpoint: ${work.firstError}`);
    await sleep(5);
  }
  await sleep(r() * 300);
  const failedOver = new Promise((res) => sup.once('failed-over', res));
  sup.crashPrimary();
  await failedOver;
  // the guest died with its host: nothing may wait on the dead primary
  await guest.detach(true);
  await work.stop();

  // the data rule: the recovered disk is a checkpoint, whatever output commit promised
  const recovered = await readServedDisk(join(dir, 'disk.sock'));
  const candidates = disks.candidates();
  assert.ok(
    candidates.some((c) => c.equals(recovered)),
    `the recovered disk is not the primary's disk at the last checkpoint confirmed${candidates.length > 1 ? ` nor at the ${candidates.length - 1} after it` : ''} (${disks.count} barriers)`,
  );
  assert.deepEqual(disks.errors, [], 'the regions listed as changed missed some');

  const acked = work.durableBefore(Infinity);
  const res = { files: acked.files.length, rows: acked.rows.length, checkpoints: checkpoints.length, barriers: disks.count, verified: disks.verified, ms: Math.round(disks.captureMs) };
  if (flushCommit) {
    await checkRecovered(join(root, 'after'), uri(dir), acked);
    return { ...res, lostFiles: 0, lostRows: 0 };
  }
  // without output commit the recovered disk is the last checkpoint: all that was
  // acknowledged before it began is there, and the rest may be lost
  const got = await examineRecovered(join(root, 'after'), uri(dir), acked);
  assert.equal(got.fsck.status, 0, `e2fsck after the journal replay:\n${got.fsck.out}`);
  assert.equal(got.integrity, 'ok');
  assert.deepEqual(got.wrongRows, [], 'rows whose payload is not the one written');
  const before = work.durableBefore(last.asked);
  assert.deepEqual(got.differing.filter((n) => before.files.some(([f]) => f === n)), [], "files fsync'd before the last checkpoint are missing or differ");
  assert.deepEqual(got.missingRows.filter((id) => before.rows.includes(id)), [], 'rows committed before the last checkpoint are missing');
  return { ...res, lostFiles: got.differing.length, lostRows: got.missingRows.length };
}

async function rounds(t: { test: (name: string, fn: (tt: { after(fn: () => unknown): void; diagnostic(m: string): void }) => Promise<void>) => Promise<unknown> }, flushCommit: boolean): Promise<RoundResult[]> {
  const r = rng(SEED + (flushCommit ? 0 : 1));
  const results: RoundResult[] = [];
  for (let i = 0; i < ROUNDS; i++) {
    await t.test(`round ${i}`, async (tt) => {
      const x = await round(tt, r, flushCommit);
      results.push(x);
      tt.diagnostic(`${x.files} files and ${x.rows} transactions acknowledged, ${x.checkpoints} checkpoints asked for, ${x.barriers} barriers recorded (${x.verified} read whole, ${x.ms} ms reading); lost: ${x.lostFiles} files, ${x.lostRows} transactions`);
    });
  }
  return results;
}

test(`guest ext4 + sqlite with output commit: every acknowledged transaction and fsync'd file survives a SIGKILLed primary (seed ${SEED}, ${ROUNDS} rounds)`, { skip, timeout: 300_000 }, async (t) => {
  const results = await rounds(t, true);
  assert.equal(results.length, ROUNDS);
  // the rounds did promise something
  assert.ok(results.every((x) => x.files + x.rows > 0));
});

test(`guest ext4 + sqlite with flushCommit: false: the same rounds lose acknowledged transactions and files (seed ${SEED + 1}, ${ROUNDS} rounds)`, { skip, timeout: 300_000 }, async (t) => {
  const results = await rounds(t, false);
  assert.equal(results.length, ROUNDS);
  const lost = results.reduce((a, x) => a + x.lostFiles + x.lostRows, 0);
  assert.ok(lost > 0, `no acknowledged file or transaction was lost without output commit: ${JSON.stringify(results)}`);
});
