// Model-based test of the order overlapping requests land in on both sides of a replication
// pair (in one process: the primary's quorum over its local qcow2 and a primary replication
// filter forwarding over a bridge to the secondary's disk, each path behind a filter that
// delays requests at random, so completions come back in any order).
//
// fast-check generates batches of concurrent writes, write-zeroes and discards at 4 KiB-aligned
// ranges of a 256 KiB disk, so most overlap; some batches meet a barrier (the quorum held in
// the middle, as block-io-hold does); checkpoints in between; a failover at the end.
// The model is the block device contract for requests in flight together: a byte that one
// or more requests of a batch cover may end up with the data of any of them (the device
// picks), a byte none covers keeps its value. Every byte of the primary's disk must be one
// the model allows, and then:
// - the secondary's disk equals the primary's disk byte for byte (after every batch, and
//   inside every barrier, where requests still wait behind it);
// - lockstep's ordering gives more than the contract asks: the writes that won each 4 KiB
//   unit fit one order of whole requests (no cycle in "A lost to B somewhere");
// - after failover the secondary's disk equals the primary's disk at the last checkpoint.
// LOCKSTEP_ORDERING_RUNS sets the number of runs; a failure prints fast-check's seed and path.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import fc from 'fast-check';
import { BlockGraph } from '../../src/block/graph.js';
import { createRegistry } from '../../src/block/registry.js';
import type { Backend } from '../../src/block/backend.js';
import type { BlockNode } from '../../src/block/node.js';
import { createQcow2 } from '../../src/block/drivers/qcow2/create.js';
import { replicationRegistry } from '../../src/replication/registry.js';
import { tempDir } from '../helpers/graph.js';
import { bridgeDriver } from '../helpers/bridge-driver.js';
import { gateDriver, gateControl } from '../helpers/gate-driver.js';

const UNIT = 4096;
const UNITS = 64;
const SIZE = UNIT * UNITS;
const RUNS = Number(process.env.LOCKSTEP_ORDERING_RUNS ?? 40);

type Req = { kind: 'write' | 'zero' | 'discard'; unit: number; units: number };
type Step = { kind: 'batch'; reqs: Req[]; barrierAfterMs: number | null } | { kind: 'checkpoint' };

const reqArb: fc.Arbitrary<Req> = fc.record({
  kind: fc.oneof({ weight: 6, arbitrary: fc.constant('write' as const) }, { weight: 1, arbitrary: fc.constant('zero' as const) }, { weight: 1, arbitrary: fc.constant('discard' as const) }),
  unit: fc.integer({ min: 0, max: UNITS - 1 }),
  units: fc.integer({ min: 1, max: 12 }),
}).map((r) => ({ ...r, units: Math.min(r.units, UNITS - r.unit) }));

const stepArb: fc.Arbitrary<Step> = fc.oneof(
  {
    weight: 5,
    arbitrary: fc.record({
      kind: fc.constant('batch' as const),
      reqs: fc.array(reqArb, { minLength: 2, maxLength: 16 }),
      barrierAfterMs: fc.option(fc.integer({ min: 0, max: 3 }), { freq: 3 }),
    }),
  },
  { weight: 1, arbitrary: fc.constant({ kind: 'checkpoint' as const }) },
);

interface Pair {
  guest: Backend;
  quorum: BlockNode;
  local: BlockNode;
  secondaryDisk: Backend;
  secondaryGraph: BlockGraph;
  close(): Promise<void>;
}

async function makePair(dir: string, run: number, delaySeed: number): Promise<Pair> {
  const f = (n: string) => join(dir, `${run}-${n}.qcow2`);
  for (const n of ['plocal', 'sdisk', 'active', 'hidden']) await createQcow2(f(n), { size: SIZE });
  const secondaryGraph = new BlockGraph(createRegistry());
  const sdisk = await secondaryGraph.open({ driver: 'qcow2', 'node-name': 'parent0', file: { driver: 'file', filename: f('sdisk') } });
  const secondaryDisk = secondaryGraph.createBackend(sdisk, { name: 'export0' });
  await secondaryGraph.open({
    driver: 'replication',
    'node-name': 'childs0',
    mode: 'secondary',
    'top-id': 'childs0',
    file: {
      driver: 'qcow2',
      file: { driver: 'file', filename: f('active') },
      backing: { driver: 'qcow2', file: { driver: 'file', filename: f('hidden') }, backing: 'parent0' },
    },
  });
  const primaryGraph = new BlockGraph(createRegistry([bridgeDriver, gateDriver]));
  primaryGraph.objects.set('link', secondaryDisk);
  const quorum = await primaryGraph.open({
    driver: 'quorum',
    'node-name': 'colo-disk0',
    'read-pattern': 'fifo',
    'vote-threshold': 1,
    children: [
      { driver: 'test-gate', 'node-name': 'local-gate', file: { driver: 'qcow2', 'node-name': 'local0', file: { driver: 'file', filename: f('plocal') } } },
      {
        driver: 'replication',
        mode: 'primary',
        'node-name': 'replication0',
        file: { driver: 'test-gate', 'node-name': 'forward-gate', file: { driver: 'test-bridge', target: 'link' } },
      },
    ],
  });
  // seeded delays of 0..2 ms on each path: completions come back in any order
  let a = delaySeed >>> 0;
  const delay = (): number => {
    a = (Math.imul(a, 1664525) + 1013904223) >>> 0;
    return a >>> 30 === 0 ? 0 : (a >>> 28) % 3;
  };
  gateControl(primaryGraph.getNode('local-gate')).delay = delay;
  gateControl(primaryGraph.getNode('forward-gate')).delay = delay;
  const guest = primaryGraph.createBackend(quorum, { name: 'guest' });
  await replicationRegistry(secondaryGraph).startAll('secondary');
  await replicationRegistry(primaryGraph).startAll('primary');
  return {
    guest,
    quorum,
    local: primaryGraph.getNode('local0'),
    secondaryDisk,
    secondaryGraph,
    close: async () => {
      await primaryGraph.closeAll();
      await secondaryGraph.closeAll();
    },
  };
}

function diff(a: Buffer, b: Buffer): string {
  const at = a.findIndex((x, i) => x !== b[i]);
  return `first difference at byte ${at} (0x${a[at]?.toString(16)} vs 0x${b[at]?.toString(16)})`;
}

/** The tag a request writes: unique within its batch, 0 for zeroes and discards. */
function tagOf(reqs: Req[], i: number, batchNo: number): number {
  return reqs[i]!.kind === 'write' ? 1 + i + 16 * (batchNo % 15) : 0;
}

/**
 * Checks the disk after a batch against the contract (every byte holds the data of a request
 * that covers it, or its old value if none does) and against one order of whole writes.
 */
function checkBatch(disk: Buffer, before: Buffer, reqs: Req[], batchNo: number): void {
  // lost[i] = writes that overwrote write i somewhere: an edge i -> j means i before j
  const after = new Map<number, Set<number>>();
  for (let u = 0; u < UNITS; u++) {
    const covering = reqs.map((r, i) => i).filter((i) => reqs[i]!.unit <= u && u < reqs[i]!.unit + reqs[i]!.units);
    const unit = disk.subarray(u * UNIT, (u + 1) * UNIT);
    if (covering.length === 0) {
      if (!unit.equals(before.subarray(u * UNIT, (u + 1) * UNIT))) throw new Error(`the unit at byte ${u * UNIT} changed, yet no request covered it`);
      continue;
    }
    const allowed = new Set(covering.map((i) => tagOf(reqs, i, batchNo)));
    for (let k = 0; k < UNIT; k++) {
      if (!allowed.has(unit[k]!)) {
        throw new Error(`byte ${u * UNIT + k} holds 0x${unit[k]!.toString(16)}, which no request of the batch covering it wrote (allowed: ${[...allowed].join(', ')})`);
      }
    }
    // the winner of this unit (a write: tags are unique); every other covering write came before it
    const v = unit[0]!;
    if (v === 0 || !unit.equals(Buffer.alloc(UNIT, v))) continue;
    const winner = covering.find((i) => tagOf(reqs, i, batchNo) === v)!;
    for (const i of covering) {
      if (i === winner || reqs[i]!.kind !== 'write') continue;
      if (!after.has(i)) after.set(i, new Set());
      after.get(i)!.add(winner);
    }
  }
  // a cycle would mean no single order of whole requests explains the disk
  const state = new Map<number, 'open' | 'done'>();
  const visit = (i: number, path: number[]): void => {
    if (state.get(i) === 'done') return;
    if (state.get(i) === 'open') throw new Error(`the writes ${path.join(' -> ')} -> ${i} overwrote each other in a cycle: no one order of whole requests`);
    state.set(i, 'open');
    for (const j of after.get(i) ?? []) visit(j, [...path, i]);
    state.set(i, 'done');
  };
  for (const i of after.keys()) visit(i, []);
}

async function runSteps(p: Pair, steps: Step[]): Promise<void> {
  let disk: Buffer = Buffer.alloc(SIZE);
  let atCheckpoint: Buffer = Buffer.alloc(SIZE);
  let batchNo = 0;
  for (const step of steps) {
    if (step.kind === 'checkpoint') {
      await replicationRegistry(p.secondaryGraph).doCheckpointAll();
      atCheckpoint = Buffer.from(disk);
      continue;
    }
    const reqs = step.reqs;
    const inFlight = reqs.map((r, i) => {
      const off = r.unit * UNIT;
      const len = r.units * UNIT;
      if (r.kind === 'zero') return p.guest.writeZeroes(off, len);
      if (r.kind === 'discard') return p.guest.discard(off, len);
      return p.guest.write(off, Buffer.alloc(len, tagOf(reqs, i, batchNo)));
    });
    if (step.barrierAfterMs !== null) {
      // the checkpoint barrier in the middle of the batch: some requests done, some in
      // flight (drained), some waiting behind others (held with them)
      await new Promise((r) => setTimeout(r, step.barrierAfterMs!));
      const release = await p.quorum.tracker.hold();
      try {
        const [l, s] = await Promise.all([p.local.read(0, SIZE), p.secondaryDisk.read(0, SIZE)]);
        if (!s.equals(l)) throw new Error(`batch ${batchNo}, inside the barrier: the secondary disk differs from the primary's: ${diff(s, l)}`);
      } finally {
        release();
      }
    }
    await Promise.all(inFlight);
    const local = await p.local.read(0, SIZE);
    try {
      checkBatch(local, disk, reqs, batchNo);
    } catch (e) {
      throw new Error(`batch ${batchNo}: ${(e as Error).message}`);
    }
    const secondary = await p.secondaryDisk.read(0, SIZE);
    if (!secondary.equals(local)) throw new Error(`batch ${batchNo}: the secondary disk differs from the primary's: ${diff(secondary, local)}`);
    if (!(await p.guest.read(0, SIZE)).equals(local)) throw new Error(`batch ${batchNo}: the guest reads something else than the local disk holds`);
    disk = local;
    batchNo++;
  }
  // failover: the secondary's disk becomes what the primary held at the last checkpoint
  await replicationRegistry(p.secondaryGraph).stopAll(true);
  for (const s of replicationRegistry(p.secondaryGraph).list()) await s.waitFailover();
  const recovered = await p.secondaryDisk.read(0, SIZE);
  if (!recovered.equals(atCheckpoint)) throw new Error(`after failover: the recovered disk differs from the primary's at the last checkpoint: ${diff(recovered, atCheckpoint)}`);
}

test(`overlapping requests in flight land alike on both sides of a pair (model, ${RUNS} runs)`, async (t) => {
  const dir = tempDir(t);
  let run = 0;
  await fc.assert(
    fc.asyncProperty(fc.array(stepArb, { minLength: 1, maxLength: 8 }), fc.integer(), async (steps, delaySeed) => {
      const p = await makePair(dir, run++, delaySeed);
      try {
        await runSteps(p, steps);
      } finally {
        await p.close();
      }
    }),
    { numRuns: RUNS },
  );
  assert.ok(run >= RUNS);
});
