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

test('x-copy-unit sets the copy unit: 8 KiB over a target of 4 KiB clusters copies 8 KiB units', async () => {
  const g = newCowGraph();
  const size = 256 * KiB;
  const src = await g.open({ driver: 'memory', size, 'node-name': 'src' }, { monitorOwned: true });
  await src.write(0, pattern(0x11, size));
  const tgt = await g.open({ driver: 'test-cow', 'node-name': 'tgt', size, 'cluster-size': 4 * KiB }, { monitorOwned: true });
  const f = await g.open({ driver: 'copy-before-write', 'node-name': 'cbw', file: 'src', target: 'tgt', 'x-copy-unit': 8 * KiB });
  const cbw = getCopyBeforeWrite(f);
  assert.equal(cbw.clusterSize, 8 * KiB);
  assert.equal(cbw.bitmap.bits, 32);
  // 100 bytes across the boundary of units 1 and 2: both copied, nothing else
  await f.write(16 * KiB - 50, pattern(0x22, 100));
  const expected = Buffer.alloc(size).fill(0x11, 8 * KiB, 24 * KiB);
  assert.ok((await tgt.read(0, size)).equals(expected));
  assert.deepEqual(f.impl.info?.(), { target: 'tgt', 'cluster-size': 8 * KiB, 'dirty-clusters': 30, 'copied-bytes': 16 * KiB });
});

test('x-copy-unit is refused below the target\'s cluster size and when not a power of two from 4 KiB to 4 MiB', async () => {
  const g = newCowGraph();
  const size = 256 * KiB;
  await g.open({ driver: 'memory', size, 'node-name': 'src' }, { monitorOwned: true });
  await g.open({ driver: 'test-cow', 'node-name': 'tgt', size, 'cluster-size': 64 * KiB }, { monitorOwned: true });
  await assert.rejects(g.open({ driver: 'copy-before-write', file: 'src', target: 'tgt', 'x-copy-unit': 32 * KiB }), {
    name: 'InvalidArgumentError',
    message: "copy unit 32768 is smaller than the cluster size 65536 of target 'tgt': a partial-cluster copy would fill the rest of the cluster from the target's backing",
  });
  for (const bad of [2048, 12 * KiB, 8 * 1024 * KiB]) {
    await assert.rejects(g.open({ driver: 'copy-before-write', file: 'src', target: 'tgt', 'x-copy-unit': bad }), {
      name: 'InvalidArgumentError',
      message: `Parameter 'x-copy-unit': copy unit ${bad} must be a power of two from 4096 to 4194304 bytes`,
    });
  }
  await g.settle();
  assert.deepEqual([...g.nodes.keys()].sort(), ['src', 'tgt']);
  // equal to the target's cluster size is allowed, and a larger one
  for (const unit of [64 * KiB, 128 * KiB]) {
    const f = await g.open({ driver: 'copy-before-write', file: 'src', target: 'tgt', 'x-copy-unit': unit });
    assert.equal(getCopyBeforeWrite(f).clusterSize, unit);
    g.collect(f);
    await g.settle();
  }
});

test('a large zero write is copied in bounded pieces: the event loop runs in between, every cluster lands', async () => {
  const g = newCowGraph();
  const MiB = 1024 * KiB;
  const size = 40 * MiB; // ten 4 MiB copies
  const src = await g.open({ driver: 'memory', size, 'node-name': 'src' }, { monitorOwned: true });
  // data in every cluster: zeroes over zeroes would need no copy (next test)
  for (let off = 0; off < size; off += 4 * MiB) await src.write(off, pattern(0x40 + off / MiB, 4 * MiB));
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

test('a zero write copies only the clusters that hold data; zero clusters keep their bits until a write of data copies them', async () => {
  const g = newCowGraph();
  const MiB = 1024 * KiB;
  const size = 40 * MiB;
  const src = await g.open({ driver: 'memory', size, 'node-name': 'src' }, { monitorOwned: true });
  // data in three places (the second one straddles two 64 KiB clusters), zeroes elsewhere
  const places = [0, 17 * MiB + 5, 39 * MiB];
  for (const off of places) await src.write(off, pattern(0x40 + (off % 7), 100 * KiB));
  const before = await src.read(0, size);
  const tgt = await g.open({ driver: 'test-cow', 'node-name': 'tgt', size }, { monitorOwned: true });
  const f = await g.open({ driver: 'copy-before-write', 'node-name': 'cbw', file: 'src', target: 'tgt' });
  const cbw = getCopyBeforeWrite(f);
  const cluster = cbw.clusterSize;
  const dataClusters = places.reduce((a, o) => a + Math.ceil((o + 100 * KiB) / cluster) - Math.floor(o / cluster), 0);
  await f.writeZeroes(0, size);
  assert.equal(cbw.copy.copiedBytes, dataClusters * cluster, 'only the clusters with data were copied');
  assert.equal(cbw.bitmap.count, cbw.bitmap.bits - dataClusters, 'the zero clusters are still to copy');
  const t = await tgt.read(0, size);
  for (const o of places) {
    const [a, b] = [Math.floor(o / cluster) * cluster, Math.ceil((o + 100 * KiB) / cluster) * cluster];
    assert.ok(t.subarray(a, b).equals(before.subarray(a, b)), `the old content at ${o}`);
  }
  const st = await tgt.blockStatus(MiB, cluster);
  assert.equal(st.allocated, false, 'nothing was written into the target for a zero cluster');
  // a write of data into a zero cluster: its old content (zeroes) is copied first
  const ref = await tgt.read(8 * MiB, cluster);
  await f.write(8 * MiB + 100, pattern(0x77, 1000));
  assert.ok((await tgt.read(8 * MiB, cluster)).equals(Buffer.alloc(cluster)));
  assert.ok(ref.equals(Buffer.alloc(cluster)));
  assert.equal((await tgt.blockStatus(8 * MiB, cluster)).allocated, true);
  assert.equal(cbw.copy.copiedBytes, (dataClusters + 1) * cluster);
  assert.ok((await src.read(0, size)).subarray(0, 8 * MiB).equals(Buffer.alloc(8 * MiB)));
  // a discard copies every cluster it covers, zero or not (a device may show other data
  // where it discarded)
  await f.discard(20 * MiB, 2 * cluster);
  assert.equal(cbw.copy.copiedBytes, (dataClusters + 3) * cluster);
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
