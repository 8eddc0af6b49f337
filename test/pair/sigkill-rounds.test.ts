// Issue 13's seeded rounds: the primary daemon SIGKILLed at a random moment under write load,
// the survivor written to, the old side brought back by a restart, again and again. After
// every restart both disks must be byte-identical, and the resync must have copied exactly
// the union of the two change records read (from the log files) before the restart: its
// extents and its byte counters, not only the result.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { join } from 'node:path';
import { PairSupervisor } from '../../src/pair/supervisor.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import { readDirtyLogFile } from '../../src/block/filters/dirty-log.js';
import { unionExtents, type ByteRange } from '../../src/pair/sync.js';
import { tempDir } from '../helpers/graph.js';
import { rng } from '../helpers/rng.js';

const run = promisify(execFile);
const MiB = 1024 * 1024;
const SIZE = 64 * MiB;
const ROUNDS = 20;
const SEED = Number(process.env.LOCKSTEP_SEED ?? 0x13c0ffee);

function pair(dir: string): PairSupervisor {
  return new PairSupervisor({
    // 256 KiB dirty-log extents: on a disk of a few MiB the pair's 4 MiB would make every
    // record after a crash name most of the disk, and the resync's bounds checked here vacuous
    dirtyExtentBytes: 256 * 1024,
    dataDir: dir,
    size: SIZE,
    checkpointIntervalMs: 100,
    heartbeatIntervalMs: 50,
    // a loaded machine must not fail a side over by itself: only the SIGKILL does
    heartbeatTimeoutMs: 3000,
    // the primary dies by SIGKILL: no lease to wait out before each failover
    leaseMs: 0,
    failover: 'auto',
    nbdSocket: join(dir, 'disk.sock'),
    log: () => {},
  });
}

const connect = (dir: string) => NbdClient.connect({ address: { type: 'unix', path: join(dir, 'disk.sock') }, exportName: 'disk' });

/** A write of 4 KiB to 256 KiB, 4 KiB aligned, anywhere on the disk, with a seeded pattern. */
function randomWrite(r: () => number): { offset: number; data: Buffer } {
  const length = (1 + Math.floor(r() * 64)) * 4096;
  const offset = Math.floor(r() * ((SIZE - length) / 4096)) * 4096;
  const data = Buffer.alloc(length);
  for (let i = 0; i < length; i += 4) data.writeUInt32LE(Math.floor(r() * 0x100000000), i);
  return { offset, data };
}

async function records(dir: string): Promise<{ union: ByteRange[]; bytes: number }> {
  const p = await readDirtyLogFile(join(dir, 'primary.qcow2.dirty'));
  const s = await readDirtyLogFile(join(dir, 'secondary.qcow2.dirty'));
  const union = unionExtents(p.extents, s.extents);
  return { union, bytes: union.reduce((a, x) => a + x.length, 0) };
}

/** qemu-img compare of the two disk files; -U: the daemons have them open (nothing writes now). */
async function identical(dir: string, shared: boolean): Promise<void> {
  const { stdout } = await run('qemu-img', ['compare', ...(shared ? ['-U'] : []), '-f', 'qcow2', '-F', 'qcow2', join(dir, 'primary.qcow2'), join(dir, 'secondary.qcow2')]);
  assert.match(stdout, /Images are identical/);
}

/** Starts the pair on the disks the last round left (the survivor's is newer) and checks the resync. */
async function restart(dir: string, round: number): Promise<PairSupervisor> {
  const before = await records(dir);
  const sup = pair(dir);
  await sup.start();
  const st = sup.status();
  assert.equal(st.sync?.kind, 'incremental', `round ${round}: ${JSON.stringify(st.sync)}`);
  assert.equal(st.sync?.source, 'secondary', `round ${round}: the survivor's disk is the newer one`);
  const copied = sup.lastResync!;
  assert.deepEqual(copied.extents, before.union, `round ${round}: the resync copied other regions than the two records name`);
  assert.equal(copied.bytes, before.bytes);
  assert.equal(copied.dataBytes + copied.zeroedBytes + copied.skippedZeroBytes, before.bytes, `round ${round}: byte counters`);
  assert.ok(before.bytes < SIZE, `round ${round}: the records name the whole disk`);
  await identical(dir, true);
  return sup;
}

test(`${ROUNDS} seeded rounds: the primary SIGKILLed under writes, writes on the survivor, the old side resynced from the two records`, { timeout: 600_000 }, async (t) => {
  const dir = tempDir(t, 'lockstep-rounds-');
  const r = rng(SEED);
  let sup = pair(dir);
  t.after(() => sup.stop());
  await sup.start();
  assert.equal(sup.status().sync?.kind, 'none');
  let copiedTotal = 0;
  for (let round = 1; round <= ROUNDS; round++) {
    // write load: 4 writers until the primary dies under them
    const c = await connect(dir);
    let dead = false;
    const writers = Array.from({ length: 4 }, async () => {
      while (!dead) {
        const w = randomWrite(r);
        await c.write(w.offset, w.data).catch(() => (dead = true));
      }
    });
    const failedOver = new Promise((ok) => sup.once('failed-over', ok));
    await new Promise((ok) => setTimeout(ok, 20 + Math.floor(r() * 400)));
    sup.crashPrimary();
    await failedOver;
    dead = true;
    await Promise.all(writers);
    await c.disconnect().catch(() => {});
    // the survivor serves: a few writes of its own
    const sc = await connect(dir);
    for (let i = 1 + Math.floor(r() * 6); i > 0; i--) {
      const w = randomWrite(r);
      await sc.write(w.offset, w.data);
    }
    await sc.flush();
    await sc.disconnect();
    await sup.stop();
    // the old primary back: a restart resyncs it from the survivor
    sup = await restart(dir, round);
    copiedTotal += sup.lastResync!.bytes;
  }
  await sup.stop();
  await identical(dir, false);
  t.diagnostic(`seed ${SEED}: ${ROUNDS} rounds, ${(copiedTotal / MiB).toFixed(1)} MiB resynced in all`);
});
