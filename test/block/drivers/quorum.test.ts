// Quorum orders overlapping writes: with a child that holds its completions back, a later
// overlapping write (write-zeroes, discard) never reaches any child before the earlier one
// completed on every child, so all children apply them in one order. Reads and
// non-overlapping writes pass; a hold drains the earlier write and holds the later one.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BlockGraph } from '../../../src/block/graph.js';
import { createRegistry } from '../../../src/block/registry.js';
import type { BlockNode } from '../../../src/block/node.js';
import { gateDriver, gateControl, type GateControl } from '../../helpers/gate-driver.js';

const SIZE = 1024 * 1024;

interface Fixture {
  quorum: BlockNode;
  slow: GateControl;
  fast: GateControl;
  disks: [BlockNode, BlockNode];
}

async function fixture(t: { after(fn: () => unknown): void }): Promise<Fixture> {
  const g = new BlockGraph(createRegistry([gateDriver]));
  // a failed assertion must not leave requests waiting at a closed gate (closeAll drains)
  t.after(async () => {
    for (const n of ['gate-a', 'gate-b']) gateControl(g.getNode(n)).openAll();
    await g.closeAll();
  });
  const child = (n: string) => ({ driver: 'test-gate', 'node-name': `gate-${n}`, file: { driver: 'memory', 'node-name': `disk-${n}`, size: SIZE } });
  const quorum = await g.open({ driver: 'quorum', 'node-name': 'q0', 'read-pattern': 'fifo', 'vote-threshold': 2, children: [child('a'), child('b')] });
  return {
    quorum,
    slow: gateControl(g.getNode('gate-a')),
    fast: gateControl(g.getNode('gate-b')),
    disks: [g.getNode('disk-a'), g.getNode('disk-b')],
  };
}

/** Lets every pending promise callback and I/O callback run. */
const settle = () => new Promise((r) => setTimeout(r, 20));

test('quorum: a later overlapping write reaches no child before the earlier one completed on every child', async (t) => {
  const f = await fixture(t);
  f.slow.closed = true;
  const first = f.quorum.write(0, Buffer.alloc(8192, 0xa1));
  await f.slow.waitingCount(1);
  await settle();
  assert.deepEqual(f.fast.completed.map((r) => r.tag), [0xa1], 'the fast child applied the first write');
  // overlaps the first write's second half
  let secondDone = false;
  const second = f.quorum.write(4096, Buffer.alloc(8192, 0xb2)).then(() => (secondDone = true));
  await settle();
  assert.equal(secondDone, false);
  assert.deepEqual(f.fast.completed.map((r) => r.tag), [0xa1], 'the second write did not overtake on the fast child');
  assert.equal(f.slow.waiting.length, 1, 'the second write waits above the children');
  f.slow.openAll();
  await Promise.all([first, second]);
  for (const c of [f.slow, f.fast]) assert.deepEqual(c.completed.map((r) => r.tag), [0xa1, 0xb2]);
  const want = Buffer.alloc(12288, 0xb2);
  want.fill(0xa1, 0, 4096);
  for (const d of f.disks) assert.ok((await d.read(0, 12288)).equals(want));
});

test('quorum: overlapping write-zeroes and discards wait too, and every child applies one order', async (t) => {
  const f = await fixture(t);
  f.slow.closed = true;
  const first = f.quorum.write(0, Buffer.alloc(65536, 0x11));
  await f.slow.waitingCount(1);
  const zero = f.quorum.writeZeroes(8192, 16384);
  const discard = f.quorum.discard(32768, 65536);
  const again = f.quorum.write(40960, Buffer.alloc(4096, 0x22));
  await settle();
  assert.deepEqual(f.fast.completed.map((r) => r.op), ['write'], 'nothing overlapping reached the fast child');
  f.slow.openAll();
  await Promise.all([first, zero, discard, again]);
  const order = (c: GateControl) => c.completed.map((r) => `${r.op}@${r.offset}`);
  assert.equal(order(f.fast)[0], 'write@0');
  assert.deepEqual(order(f.slow), order(f.fast));
  const [a, b] = await Promise.all(f.disks.map((d) => d.read(0, 131072)));
  assert.ok(a!.equals(b!), `the children differ at byte ${a!.findIndex((x, i) => x !== b![i])}`);
});

test('quorum: reads and non-overlapping writes are not held behind a slow write', async (t) => {
  const f = await fixture(t);
  f.slow.closed = true;
  const first = f.quorum.write(0, Buffer.alloc(8192, 0x33));
  await f.slow.waitingCount(1);
  // a read of the same range is answered (from the first child, which has not got the write yet)
  assert.ok((await f.quorum.read(0, 8192)).equals(Buffer.alloc(8192)));
  // a write next to it reaches both children at once (the slow child holds it at its gate
  // like every write, but the quorum sent it without waiting)
  const beside = f.quorum.write(8192, Buffer.alloc(4096, 0x44));
  await f.slow.waitingCount(2);
  await settle();
  assert.deepEqual(f.fast.completed.map((r) => r.tag), [0x33, 0x44]);
  f.slow.openAll();
  await Promise.all([first, beside]);
});

test('quorum: a hold drains the earlier write and holds the overlapping one waiting behind it', async (t) => {
  const f = await fixture(t);
  f.slow.closed = true;
  const first = f.quorum.write(0, Buffer.alloc(8192, 0x55));
  await f.slow.waitingCount(1);
  const second = f.quorum.write(4096, Buffer.alloc(4096, 0x66));
  let held = false;
  const holding = f.quorum.tracker.hold().then((release) => {
    held = true;
    return release;
  });
  await settle();
  assert.equal(held, false, 'the hold waits for the write in flight');
  f.slow.openAll();
  const release = await holding;
  await first;
  await settle();
  // inside the barrier: both children hold exactly the first write, the second waits
  assert.deepEqual(f.fast.completed.map((r) => r.tag), [0x55]);
  assert.deepEqual(f.slow.completed.map((r) => r.tag), [0x55]);
  const [a, b] = await Promise.all(f.disks.map((d) => d.read(0, 8192)));
  assert.ok(a!.equals(Buffer.alloc(8192, 0x55)) && b!.equals(a!));
  release();
  await second;
  for (const c of [f.slow, f.fast]) assert.deepEqual(c.completed.map((r) => r.tag), [0x55, 0x66]);
});
