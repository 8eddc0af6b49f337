import { test } from 'node:test';
import assert from 'node:assert/strict';
import { pattern } from '../../helpers/graph.js';
import { newCowGraph } from '../../helpers/cow.js';
import { getCopyBeforeWrite } from '../../../src/block/filters/copy-before-write.js';

const KiB = 1024;

test('a copy-before-write node opened by options copies whole clusters of the target cluster size', async () => {
  const g = newCowGraph();
  const size = 1000 * KiB; // the last 128 KiB cluster is short (104 KiB)
  const src = await g.open({ driver: 'memory', size, 'node-name': 'src' }, { monitorOwned: true });
  await src.write(0, pattern(0x11, size));
  const tgt = await g.open({ driver: 'test-cow', 'node-name': 'tgt', size, 'cluster-size': 128 * KiB }, { monitorOwned: true });
  const f = await g.open({ driver: 'copy-before-write', 'node-name': 'cbw', file: 'src', target: 'tgt' });
  const cbw = getCopyBeforeWrite(f);
  assert.equal(cbw.clusterSize, 128 * KiB);
  assert.equal(cbw.bitmap.bits, 8);
  await f.write(130 * KiB, pattern(0x22, 10)); // cluster 1
  await f.writeZeroes(size - 10, 10); // the short last cluster
  await f.discard(0, 1); // advisory, but still copies cluster 0 first
  const t = await tgt.read(0, size);
  const expected = Buffer.alloc(size).fill(0x11, 0, 256 * KiB).fill(0x11, 896 * KiB);
  assert.ok(t.equals(expected));
  assert.equal(cbw.bitmap.count, 5);
  assert.deepEqual(f.impl.info?.(), { target: 'tgt', 'cluster-size': 128 * KiB, 'dirty-clusters': 5, 'copied-bytes': 2 * 128 * KiB + 104 * KiB });
  // a second write to a copied cluster copies nothing
  await f.write(131 * KiB, pattern(0x33, 10));
  assert.ok((await tgt.read(128 * KiB, 128 * KiB)).equals(pattern(0x11, 128 * KiB)));
  assert.ok((await f.read(130 * KiB, 20)).equals(Buffer.concat([pattern(0x22, 10), pattern(0x11, 1014)]).subarray(0, 20)));
});

test('copy-before-write option errors', async () => {
  const g = newCowGraph();
  await g.open({ driver: 'memory', size: 4096, 'node-name': 'src' }, { monitorOwned: true });
  await g.open({ driver: 'memory', size: 1024, 'node-name': 'small' }, { monitorOwned: true });
  await g.open({ driver: 'memory', size: 4096, 'node-name': 'ro', 'read-only': true }, { monitorOwned: true });
  await assert.rejects(g.open({ driver: 'copy-before-write', file: 'src' }), { message: "Parameter 'target' is missing" });
  await assert.rejects(g.open({ driver: 'copy-before-write', file: 'src', target: 'small' }), {
    message: 'Source and target image have different sizes (4096 and 1024 bytes)',
  });
  await assert.rejects(g.open({ driver: 'copy-before-write', file: 'src', target: 'ro' }), { message: 'Block node is read-only' });
  await assert.rejects(g.open({ driver: 'copy-before-write', file: 'src', target: 'ro', bitmap: { node: 'x', name: 'y' } }), {
    message: "Parameter 'bitmap' is not supported by copy-before-write",
  });
  assert.deepEqual([...g.nodes.keys()].sort(), ['ro', 'small', 'src']);
});

test('a large zero write is copied in bounded pieces: the event loop runs in between, every cluster lands', async () => {
  const g = newCowGraph();
  const MiB = 1024 * KiB;
  const size = 40 * MiB; // ten 4 MiB copies
  const src = await g.open({ driver: 'memory', size, 'node-name': 'src' }, { monitorOwned: true });
  // data in some clusters, zeroes elsewhere
  for (const off of [0, 17 * MiB + 5, 39 * MiB]) await src.write(off, pattern(0x40 + (off % 7), 100 * KiB));
  const before = await src.read(0, size);
  await g.open({ driver: 'test-cow', 'node-name': 'tgt', size }, { monitorOwned: true });
  const f = await g.open({ driver: 'copy-before-write', 'node-name': 'cbw', file: 'src', target: 'tgt' });
  const cbw = getCopyBeforeWrite(f);
  let turns = 0;
  const tick = setInterval(() => turns++, 0);
  try {
    await f.writeZeroes(0, size);
  } finally {
    clearInterval(tick);
  }
  // one request, yet timers ran while it was copying and zeroing
  assert.ok(turns > 0, 'the event loop had turns during the request');
  assert.ok(g.pacer.yields > 0);
  assert.equal(cbw.bitmap.count, 0);
  assert.equal(cbw.copy.copiedBytes, size);
  assert.ok((await g.lookup('tgt')!.read(0, size)).equals(before), 'the target holds the old content of every cluster');
  assert.ok((await src.read(0, size)).equals(Buffer.alloc(size)));
});

test('a checkpoint counts a write issued before it as in flight and holds one issued during it (one quiesce: the node tracker)', async () => {
  const g = newCowGraph();
  const size = 256 * KiB;
  const src = await g.open({ driver: 'memory', size, 'node-name': 'src' }, { monitorOwned: true });
  await src.write(0, pattern(0x11, size));
  const tgt = await g.open({ driver: 'memory', size, 'node-name': 'tgt' }, { monitorOwned: true });
  const f = await g.open({ driver: 'copy-before-write', 'node-name': 'cbw', file: 'src', target: 'tgt' });
  const cbw = getCopyBeforeWrite(f);
  const events: string[] = [];
  // issued in the same turn as the checkpoint, before it: its copy belongs to the old interval
  const before = f.write(0, pattern(0x22, 64 * KiB)).then(() => events.push('write before'));
  const checkpoint = cbw.checkpoint(async () => {
    events.push('checkpoint');
    assert.equal(f.tracker.inFlight, 0);
    assert.equal(cbw.bitmap.count, cbw.bitmap.bits, 'the reset marks every cluster still to be copied');
    await tgt.writeZeroes(0, size); // the overlay emptied, as replication does here
  });
  const during = f.write(64 * KiB, pattern(0x33, 64 * KiB)).then(() => events.push('write during'));
  await Promise.all([before, checkpoint, during]);
  assert.deepEqual(events, ['write before', 'checkpoint', 'write during']);
  // the held write copied its cluster's old content after the overlay was emptied
  const t = await tgt.read(0, size);
  assert.ok(t.equals(Buffer.alloc(size).fill(0x11, 64 * KiB, 128 * KiB)));
  assert.equal(cbw.bitmap.count, cbw.bitmap.bits - 1);
  const s = await src.read(0, 128 * KiB);
  assert.ok(s.equals(Buffer.concat([pattern(0x22, 64 * KiB), pattern(0x33, 64 * KiB)])));
});
