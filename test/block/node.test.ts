import { test } from 'node:test';
import assert from 'node:assert/strict';
import { newGraph, pattern } from '../helpers/graph.js';
import { BlockError } from '../../src/errors.js';
import { BlockGraph } from '../../src/block/graph.js';
import { createRegistry } from '../../src/block/registry.js';
import { makeCaps, type BlockDriver, type NodeImpl } from '../../src/block/driver.js';

test('unaligned writes on a 512-aligned node are read-modify-written exactly', async () => {
  const g = newGraph();
  const n = await g.open({ driver: 'memory', size: 8192, align: 512 });
  await n.write(0, pattern(0xaa, 8192));
  await n.write(1000, pattern(0x55, 1000));
  const all = await n.read(0, 8192);
  const expected = pattern(0xaa, 8192);
  expected.fill(0x55, 1000, 2000);
  assert.ok(all.equals(expected));
  assert.ok((await n.read(999, 3)).equals(Buffer.from([0xaa, 0x55, 0x55])));
  // head and tail in the same block
  await n.write(3000, pattern(0x77, 10));
  expected.fill(0x77, 3000, 3010);
  assert.ok((await n.read(0, 8192)).equals(expected));
});

test('requests larger than maxTransfer are split and reassembled', async () => {
  const g = newGraph();
  const n = await g.open({ driver: 'memory', size: 1 << 20, align: 512, 'max-transfer': 4096 });
  const data = Buffer.alloc(100_000);
  for (let i = 0; i < data.length; i++) data[i] = (i * 7) & 0xff;
  await n.write(512, data);
  assert.ok((await n.read(512, data.length)).equals(data));
  assert.ok((await n.read(513, 5000)).equals(data.subarray(1, 5001)));
});

test('overlapping unaligned writes are serialised and never lose bytes', async () => {
  const g = newGraph();
  const n = await g.open({ driver: 'memory', size: 4096, align: 512 });
  // Two writes into the same 512-byte block, issued concurrently: without serialisation the
  // second read-modify-write would overwrite the first's bytes with stale data.
  await Promise.all([n.write(10, pattern(1, 10)), n.write(100, pattern(2, 10)), n.write(300, pattern(3, 10))]);
  const b = await n.read(0, 512);
  const expected = Buffer.alloc(512);
  expected.fill(1, 10, 20).fill(2, 100, 110).fill(3, 300, 310);
  assert.ok(b.equals(expected));
});

test('write-zeroes is emulated where the driver lacks it, and reads back zeroes', async () => {
  const g = newGraph();
  const n = await g.open({ driver: 'memory', size: 3 << 20, align: 512 });
  await n.write(0, pattern(0xff, 3 << 20));
  await n.writeZeroes(700, (2 << 20) + 5);
  const b = await n.read(0, 3 << 20);
  const expected = pattern(0xff, 3 << 20).fill(0, 700, 700 + (2 << 20) + 5);
  assert.ok(b.equals(expected));
});

test('out-of-range and read-only requests fail with errno-like codes', async () => {
  const g = newGraph();
  const n = await g.open({ driver: 'memory', size: 4096 });
  const be = g.createBackend(n);
  await assert.rejects(be.read(4000, 200), (e: unknown) => e instanceof BlockError && e.code === 'EIO');
  const ro = await g.open({ driver: 'memory', size: 4096, 'read-only': true });
  await assert.rejects(ro.write(0, pattern(1, 1)), (e: unknown) => e instanceof BlockError && e.code === 'EPERM');
});

test('block status reports the longest same-status run', async () => {
  const g = newGraph();
  const n = await g.open({ driver: 'memory', size: 1 << 20 });
  await n.write(128 * 1024, pattern(1, 64 * 1024));
  assert.deepEqual(await n.blockStatus(0, 1 << 20), { length: 128 * 1024, allocated: true, data: false, zero: true });
  const s = await n.blockStatus(128 * 1024, (1 << 20) - 128 * 1024);
  assert.equal(s.length, 64 * 1024);
  assert.equal(s.data, true);
});

test('raw over memory forwards a window of its file', async () => {
  const g = newGraph();
  await g.open({ driver: 'memory', size: 8192, 'node-name': 'm0' });
  const r = await g.open({ driver: 'raw', file: 'm0', offset: 1024, size: 2048 });
  assert.equal(r.getLength(), 2048);
  await r.write(0, pattern(9, 2048));
  const m = g.getNode('m0');
  assert.ok((await m.read(1024, 2048)).equals(pattern(9, 2048)));
  assert.ok((await m.read(0, 1024)).equals(pattern(0, 1024)));
});

test('tracker hold waits for in-flight requests and delays new ones', async () => {
  const g = newGraph();
  const n = await g.open({ driver: 'memory', size: 4096 });
  const order: string[] = [];
  const inflight = await n.tracker.begin(0, 512);
  const holding = n.tracker.hold().then((release) => {
    order.push('held');
    return release;
  });
  const later = n.write(0, pattern(1, 512)).then(() => order.push('write'));
  await new Promise((r) => setTimeout(r, 10));
  assert.deepEqual(order, []);
  n.tracker.end(inflight);
  const release = await holding;
  await new Promise((r) => setTimeout(r, 10));
  assert.deepEqual(order, ['held']);
  release();
  await later;
  assert.deepEqual(order, ['held', 'write']);
});

test('graph: inline children, references, name rules, cycles and deletion', async () => {
  const g = newGraph();
  const base = await g.open({ driver: 'memory', size: 4096, 'node-name': 'base0' }, { monitorOwned: true });
  const top = await g.open({ driver: 'raw', 'node-name': 'top0', file: 'base0' }, { monitorOwned: true });
  assert.equal(top.file, base);
  await assert.rejects(g.open({ driver: 'raw', file: 'nope' }), /Cannot find device='nope' nor node-name='nope'/);
  await assert.rejects(g.open({ driver: 'memory', size: 1, 'node-name': 'top0' }), /Duplicate nodes with node-name='top0'/);
  await assert.rejects(g.open({ driver: 'memory', size: 1, 'node-name': '1bad' }), /Invalid node-name: '1bad'/);
  await assert.rejects(g.open({ driver: 'memory', size: 1, bogus: 1 }), /Parameter 'bogus' is unexpected/);
  await assert.rejects(g.open({ driver: 'raw', file: { driver: 'memory', size: 1, x: 1 } }), /Parameter 'file.x' is unexpected/);
  await assert.rejects(g.open({ driver: 'nosuch' }), /Parameter 'driver' does not accept value 'nosuch'/);
  await assert.rejects(g.open({ size: 1 }), /Parameter 'driver' is missing/);
  await assert.rejects(g.deleteNode('base0'), /Block device base0 is in use/);
  await g.deleteNode('top0');
  await g.deleteNode('base0');
  assert.equal(g.nodes.size, 0);
  assert.throws(() => g.attach(base, 'file', base), /cycle/);
});

test('graph: a failed open leaves no node behind', async () => {
  const g = newGraph();
  await assert.rejects(g.open({ driver: 'raw', file: { driver: 'memory', size: 4096 }, offset: 9000 }));
  await g.settle();
  assert.equal(g.nodes.size, 0);
});

test('graph: a filter inserted above a node takes over its parents and backends', async () => {
  const g = newGraph();
  const disk = await g.open({ driver: 'memory', size: 4096, 'node-name': 'disk' }, { monitorOwned: true });
  const be = g.createBackend(disk, { name: 'dev0' });
  const filter = await g.open({ driver: 'raw', 'node-name': 'f', file: 'disk' });
  g.insertFilter(filter, disk);
  assert.equal(be.node, filter);
  assert.equal(g.lookup('dev0'), filter);
  g.dropFilter(filter);
  await g.settle();
  assert.equal(be.node, disk);
  assert.equal(g.lookup('f'), null);
});

test('a reopen waits for the requests given the old handle, and requests during it use the new one', async () => {
  // A protocol driver whose "descriptor" is a number, as the file driver's is: a request
  // that completes on a descriptor already closed by a reopen is the race this guards.
  const events: string[] = [];
  const pending: Array<() => void> = [];
  const handleDriver: BlockDriver = {
    name: 'test-handle',
    kind: 'protocol',
    async open(_ctx, o): Promise<NodeImpl> {
      o.done();
      let fd = 1;
      const closed = new Set<number>();
      const data = Buffer.alloc(4096, 7);
      return {
        caps: makeCaps({}),
        getLength: () => data.length,
        read: async (offset, length) => {
          const used = fd;
          events.push(`read on fd ${used}`);
          await new Promise<void>((r) => pending.push(r));
          if (closed.has(used)) throw new Error(`read completed on closed fd ${used}`);
          events.push(`read done on fd ${used}`);
          return Buffer.from(data.subarray(offset, offset + length));
        },
        reopen: async (ro) => {
          events.push(`reopen ${ro ? 'ro' : 'rw'}: fd ${fd} closed, fd ${fd + 1} opened`);
          closed.add(fd);
          fd++;
        },
        close: async () => {},
      };
    },
  };
  const g = new BlockGraph(createRegistry([handleDriver]));
  const n = await g.open({ driver: 'test-handle' }, { readOnly: true });
  const first = n.read(0, 512);
  await new Promise((r) => setImmediate(r));
  const reopened = n.setReadOnly(false);
  await new Promise((r) => setImmediate(r));
  const second = n.read(512, 512);
  await new Promise((r) => setImmediate(r));
  assert.deepEqual(events, ['read on fd 1'], 'the reopen and the later read wait for the read in flight');
  pending.shift()!();
  await reopened;
  await new Promise((r) => setImmediate(r));
  pending.shift()!();
  assert.ok((await first).equals(Buffer.alloc(512, 7)));
  assert.ok((await second).equals(Buffer.alloc(512, 7)));
  assert.deepEqual(events, ['read on fd 1', 'read done on fd 1', 'reopen rw: fd 1 closed, fd 2 opened', 'read on fd 2', 'read done on fd 2']);
  assert.equal(n.readOnly, false);
});
