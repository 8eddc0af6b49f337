// Model-based test of replication: random sequences of primary writes (through the quorum,
// forwarded to the secondary disk), secondary writes (through the top), reads of both views,
// checkpoints, failover and stop without failover, on real qcow2 overlays with concurrent
// requests in flight. After every step both views are compared byte for byte with a small
// reference model of the rule:
//   primary view   = the primary's local disk
//   secondary view = the secondary disk at the last checkpoint + the secondary's own writes
//                    (i.e. active, else hidden, else the secondary disk)
//   after failover = the secondary disk holds exactly the secondary view.
// Seeded; the seed is printed on failure. LOCKSTEP_MODEL_RUNS sets the number of sequences.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { BlockGraph } from '../../src/block/graph.js';
import { createRegistry } from '../../src/block/registry.js';
import type { Backend } from '../../src/block/backend.js';
import { createQcow2 } from '../../src/block/drivers/qcow2/create.js';
import { replicationRegistry } from '../../src/replication/registry.js';
import { tempDir } from '../helpers/graph.js';
import { rng } from '../helpers/rng.js';
import { bridgeDriver } from '../helpers/bridge-driver.js';

const SIZE = 2 * 1024 * 1024;
const RUNS = Number(process.env.LOCKSTEP_MODEL_RUNS ?? 250);
const STEPS = 14;

interface Pair {
  guest: Backend;
  top: Backend;
  secondaryDisk: Backend;
  primaryGraph: BlockGraph;
  secondaryGraph: BlockGraph;
}

async function makePair(dir: string, run: number, copyUnit?: number): Promise<Pair> {
  const f = (n: string) => join(dir, `${run}-${n}.qcow2`);
  // with a copy unit the hidden disk has clusters of that size (the pair's --copy-unit)
  for (const n of ['plocal', 'sdisk', 'active', 'hidden']) {
    await createQcow2(f(n), { size: SIZE, ...(n === 'hidden' && copyUnit !== undefined ? { clusterSize: copyUnit } : {}) });
  }
  const secondaryGraph = new BlockGraph(createRegistry());
  const sdisk = await secondaryGraph.open({ driver: 'qcow2', 'node-name': 'parent0', file: { driver: 'file', filename: f('sdisk') } });
  const exportBackend = secondaryGraph.createBackend(sdisk, { name: 'export0' });
  const repl = await secondaryGraph.open({
    driver: 'replication',
    'node-name': 'childs0',
    mode: 'secondary',
    'top-id': 'childs0',
    ...(copyUnit !== undefined ? { 'x-copy-unit': copyUnit } : {}),
    file: {
      driver: 'qcow2',
      file: { driver: 'file', filename: f('active') },
      backing: { driver: 'qcow2', file: { driver: 'file', filename: f('hidden') }, backing: 'parent0' },
    },
  });
  const top = secondaryGraph.createBackend(repl, { name: 'colo-disk0' });
  const primaryGraph = new BlockGraph(createRegistry([bridgeDriver]));
  primaryGraph.objects.set('link', exportBackend);
  const quorum = await primaryGraph.open({
    driver: 'quorum',
    'node-name': 'colo-disk0',
    'read-pattern': 'fifo',
    'vote-threshold': 1,
    children: [
      { driver: 'qcow2', file: { driver: 'file', filename: f('plocal') } },
      { driver: 'replication', mode: 'primary', 'node-name': 'replication0', file: { driver: 'test-bridge', target: 'link' } },
    ],
  });
  const guest = primaryGraph.createBackend(quorum, { name: 'guest' });
  await replicationRegistry(secondaryGraph).startAll('secondary');
  await replicationRegistry(primaryGraph).startAll('primary');
  return { guest, top, secondaryDisk: exportBackend, primaryGraph, secondaryGraph };
}

function describeDiff(a: Buffer, b: Buffer): string {
  const at = a.findIndex((x, i) => x !== b[i]);
  return `first difference at byte ${at}: got 0x${a[at]?.toString(16)}, model 0x${b[at]?.toString(16)}`;
}

export async function runSequence(seed: number, dir: string, run: number, copyUnit?: number): Promise<void> {
  const rand = rng(seed);
  const int = (n: number) => Math.floor(rand() * n);
  const p = await makePair(dir, run, copyUnit);
  const primaryDisk = Buffer.alloc(SIZE);
  const secondaryView = Buffer.alloc(SIZE);
  let failedOver = false;
  let stopped = false;
  const log: string[] = [];
  const check = async (what: string): Promise<void> => {
    const trace = (m: string) => process.env.LOCKSTEP_MODEL_TRACE && console.error(`  ${what}: ${m}`);
    trace(`read primary; nodes ${[...p.secondaryGraph.nodes.keys()].join(' ')}`);
    const pv = await p.guest.read(0, SIZE);
    trace('read secondary');
    const dump = process.env.LOCKSTEP_MODEL_TRACE
      ? setTimeout(() => {
          for (const n of p.secondaryGraph.nodes.values()) console.error(`    ${n.name} ${n.driver.name} inflight=${n.tracker.inFlight} held=${n.tracker.held}`);
        }, 1000)
      : null;
    if (!pv.equals(primaryDisk)) throw new Error(`${what}: primary view: ${describeDiff(pv, primaryDisk)}`);
    const sv = await p.top.read(0, SIZE);
    if (dump) clearTimeout(dump);
    if (!sv.equals(secondaryView)) throw new Error(`${what}: secondary view: ${describeDiff(sv, secondaryView)}`);
    trace('read disk');
    if (!failedOver && !stopped) {
      const sd = await p.secondaryDisk.read(0, SIZE);
      if (!sd.equals(primaryDisk)) throw new Error(`${what}: secondary disk: ${describeDiff(sd, primaryDisk)}`);
    }
  };
  /** up to 4 writes to disjoint slots, issued together */
  const burst = (): Array<{ offset: number; data: Buffer }> => {
    const n = 1 + int(4);
    const slot = SIZE / 4;
    const slots = [0, 1, 2, 3].sort(() => rand() - 0.5).slice(0, n);
    return slots.map((s) => {
      const length = 1 + int(rand() < 0.3 ? 200_000 : 9000);
      const offset = s * slot + int(slot - length);
      return { offset, data: Buffer.alloc(length, 1 + int(255)) };
    });
  };
  try {
    for (let step = 0; step < STEPS; step++) {
      const r = rand();
      if (process.env.LOCKSTEP_MODEL_TRACE) console.error(`seed ${seed} step ${step} r=${r.toFixed(3)}`);
      if (failedOver || stopped) {
        // after failover or stop the secondary carries on alone
        const ws = burst();
        log.push(`svm-only ${ws.map((w) => `${w.offset}+${w.data.length}`).join(',')}`);
        await Promise.all(ws.map((w) => p.top.write(w.offset, w.data)));
        for (const w of ws) w.data.copy(secondaryView, w.offset);
      } else if (r < 0.35) {
        const ws = burst();
        log.push(`pvm ${ws.map((w) => `${w.offset}+${w.data.length}`).join(',')}`);
        await Promise.all(ws.map((w) => p.guest.write(w.offset, w.data)));
        for (const w of ws) w.data.copy(primaryDisk, w.offset);
      } else if (r < 0.6) {
        const ws = burst();
        log.push(`svm ${ws.map((w) => `${w.offset}+${w.data.length}`).join(',')}`);
        await Promise.all(ws.map((w) => p.top.write(w.offset, w.data)));
        for (const w of ws) w.data.copy(secondaryView, w.offset);
      } else if (r < 0.75) {
        // both sides at once (different nodes, so their order does not matter)
        const pw = burst();
        const sw = burst();
        log.push(`both pvm ${pw.map((w) => `${w.offset}+${w.data.length}`).join(',')} svm ${sw.map((w) => `${w.offset}+${w.data.length}`).join(',')}`);
        await Promise.all([...pw.map((w) => p.guest.write(w.offset, w.data)), ...sw.map((w) => p.top.write(w.offset, w.data))]);
        for (const w of pw) w.data.copy(primaryDisk, w.offset);
        for (const w of sw) w.data.copy(secondaryView, w.offset);
      } else if (r < 0.9) {
        log.push('checkpoint');
        await replicationRegistry(p.secondaryGraph).doCheckpointAll();
        primaryDisk.copy(secondaryView);
      } else if (r < 0.96) {
        log.push('failover');
        await replicationRegistry(p.secondaryGraph).stopAll(true);
        failedOver = true;
        await check(`step ${step} (during commit)`);
        for (const s of replicationRegistry(p.secondaryGraph).list()) await s.waitFailover();
        const sd = await p.secondaryDisk.read(0, SIZE);
        if (!sd.equals(secondaryView)) throw new Error(`after failover the secondary disk: ${describeDiff(sd, secondaryView)}`);
      } else {
        log.push('stop');
        await replicationRegistry(p.secondaryGraph).stopAll(false);
        primaryDisk.copy(secondaryView);
        stopped = true;
      }
      if (process.env.LOCKSTEP_MODEL_TRACE) console.error(`seed ${seed} step ${step}: ${log[log.length - 1]}`);
      await check(`step ${step}`);
    }
  } catch (e) {
    if (process.env.LOCKSTEP_MODEL_TRACE) console.error(e);
    throw new Error(`seed ${seed}: ${(e as Error).message}\nsteps: ${log.join(' | ')}`);
  } finally {
    await p.primaryGraph.closeAll();
    await p.secondaryGraph.closeAll();
  }
}

test(`replication matches its model over ${RUNS} random sequences`, async (t) => {
  const dir = tempDir(t);
  const base = Number(process.env.LOCKSTEP_MODEL_SEED ?? Date.now() % 1_000_000);
  for (let run = 0; run < RUNS; run++) await runSequence(base + run, dir, run);
});

test(`with a 4 KiB copy unit (x-copy-unit, hidden disk of 4 KiB clusters) replication matches its model over ${RUNS} random sequences`, async (t) => {
  const dir = tempDir(t);
  const base = Number(process.env.LOCKSTEP_MODEL_SEED ?? Date.now() % 1_000_000);
  for (let run = 0; run < RUNS; run++) await runSequence(base + run, dir, run, 4096);
});
