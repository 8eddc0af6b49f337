// The NBD server's pool of write payload buffers (issue 14): a buffer goes back only once
// its write has succeeded everywhere below, so a poisoning pool never changes a byte that
// reaches a disk, on the primary's own disk or forwarded over NBD to a secondary.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { NbdClient } from '../../../src/nbd/client/client.js';
import { PayloadPool, POISON_BYTE } from '../../../src/nbd/server/payload-pool.js';
import { NbdServer } from '../../../src/nbd/server/server.js';
import type { SocketAddress } from '../../../src/util/socket-address.js';
import { BlockGraph } from '../../../src/block/graph.js';
import { createRegistry } from '../../../src/block/registry.js';
import { newGraph } from '../../helpers/graph.js';
import { gateDriver, gateControl } from '../../helpers/gate-driver.js';
import { patterned, serveMemory } from '../helpers.js';

const MiB = 1024 * 1024;

test('buffers come in power-of-two classes, are reused, poisoned on release, and bounded in total', () => {
  const pool = new PayloadPool({ maxIdleBytes: 2 * MiB, minClass: 256 * 1024, poison: true });
  const a = pool.acquire(MiB - 512);
  assert.equal(a.length, MiB - 512);
  a.fill(7);
  pool.release(a);
  assert.ok(a.every((b) => b === POISON_BYTE), 'a released buffer is poisoned');
  const b = pool.acquire(700 * 1024); // same 1 MiB class: the same memory again
  assert.equal(b.buffer, a.buffer);
  assert.equal(b.length, 700 * 1024);
  pool.release(b);
  pool.release(b); // a second release is ignored, never a second idle entry
  pool.release(Buffer.alloc(MiB)); // not the pool's: ignored
  assert.deepEqual(pool.stats(), { acquired: 2, reused: 1, released: 2, idleBytes: MiB });
  const held = [pool.acquire(MiB), pool.acquire(MiB), pool.acquire(MiB)];
  for (const h of held) pool.release(h);
  assert.equal(pool.stats().idleBytes, 2 * MiB, 'idle bytes stay within the bound; the rest goes to the GC');
  assert.throws(() => new PayloadPool({ minClass: 3000 }), /power of two/);
});

/** A primary serving a quorum of its own disk and an NBD child forwarding to a secondary. */
async function forwardingPair(t: import('node:test').TestContext, size: number) {
  const secondary = await serveMemory(t, { size, server: { payloadPool: null } });
  const graph = newGraph();
  const pool = new PayloadPool({ poison: true });
  const quorum = await graph.open(
    {
      driver: 'quorum',
      'node-name': 'q0',
      'vote-threshold': 1,
      children: [
        { driver: 'memory', 'node-name': 'local', size },
        { driver: 'nbd', 'node-name': 'fwd', server: { type: 'inet', host: '127.0.0.1', port: String(secondary.tcp.port) }, export: 'disk0' },
      ],
    },
    { monitorOwned: true },
  );
  const server = new NbdServer({ graph, payloadPool: pool });
  const addr = (await server.listen({ type: 'inet', host: '127.0.0.1', port: 0 })) as Extract<SocketAddress, { type: 'inet' }>;
  server.addExport({ name: 'disk0', node: quorum, writable: true });
  t.after(async () => {
    await server.close();
    await graph.closeAll();
  });
  const client = await NbdClient.connect({ address: { type: 'inet', host: '127.0.0.1', port: addr.port }, exportName: 'disk0' });
  t.after(() => client.destroy());
  return { secondary, graph, pool, client, local: graph.getNode('local') };
}

test('concurrent 1 MiB writes through a poisoning pool reach the own disk and the secondary byte for byte', async (t) => {
  const size = 16 * MiB;
  const { secondary, pool, client, local } = await forwardingPair(t, size);
  const expected = Buffer.alloc(size);
  // three rounds over the disk, 16 writes in flight each: later rounds reuse released buffers
  for (let round = 0; round < 3; round++) {
    await Promise.all(
      Array.from({ length: 16 }, (_, i) => {
        const data = patterned(MiB, 1 + round * 100 + i);
        data.copy(expected, i * MiB);
        return client.write(i * MiB, data);
      }),
    );
  }
  assert.ok(pool.stats().reused > 0, `the pool reused buffers (${JSON.stringify(pool.stats())})`);
  assert.equal(pool.stats().released, pool.stats().acquired, 'every pooled payload went back after its write');
  assert.ok((await local.read(0, size)).equals(expected), "the primary's own disk holds exactly what was written");
  assert.ok((await secondary.node.read(0, size)).equals(expected), "the secondary's disk holds exactly what was written");
});

test('a forward that fails mid-write (secondary gone) keeps its payload: the own disk stays exact', async (t) => {
  const size = 16 * MiB;
  const { secondary, pool, client, local } = await forwardingPair(t, size);
  const expected = Buffer.alloc(size);
  const writes = Array.from({ length: 16 }, (_, i) => {
    const data = patterned(MiB, 500 + i);
    data.copy(expected, i * MiB);
    return client.write(i * MiB, data);
  });
  // The secondary drops its connections while forwards are in flight: the quorum (threshold 1)
  // still succeeds on the own disk, and a forward that failed never gives its buffer back.
  await secondary.server.close();
  await Promise.all(writes);
  const failedForwards = pool.stats().acquired - pool.stats().released;
  for (let i = 0; i < 16; i++) {
    const data = patterned(MiB, 900 + i);
    data.copy(expected, i * MiB);
    await client.write(i * MiB, data);
  }
  assert.ok((await local.read(0, size)).equals(expected), "the primary's own disk holds exactly what was written");
  assert.equal(pool.stats().acquired - pool.stats().released, failedForwards, 'writes after the loss release as before');
});

test('a quorum child that writes later than its sibling still gets the bytes: the payload goes back after both', async (t) => {
  const size = 8 * MiB;
  const graph = new BlockGraph(createRegistry([gateDriver]));
  const quorum = await graph.open(
    {
      driver: 'quorum',
      'node-name': 'q0',
      'vote-threshold': 1,
      children: [
        { driver: 'memory', 'node-name': 'fast', size },
        { driver: 'test-gate', 'node-name': 'gate', file: { driver: 'memory', 'node-name': 'slow', size } },
      ],
    },
    { monitorOwned: true },
  );
  const gate = gateControl(graph.getNode('gate'));
  const pool = new PayloadPool({ poison: true });
  const server = new NbdServer({ graph, payloadPool: pool });
  const addr = (await server.listen({ type: 'inet', host: '127.0.0.1', port: 0 })) as Extract<SocketAddress, { type: 'inet' }>;
  server.addExport({ name: 'disk0', node: quorum, writable: true });
  t.after(async () => {
    gate.openAll();
    await server.close();
    await graph.closeAll();
  });
  const client = await NbdClient.connect({ address: { type: 'inet', host: '127.0.0.1', port: addr.port }, exportName: 'disk0' });
  t.after(() => client.destroy());
  const expected = Buffer.alloc(size);
  for (let round = 0; round < 2; round++) {
    gate.closed = true;
    const writes = Array.from({ length: 8 }, (_, i) => {
      const data = patterned(MiB, 40 + round * 10 + i);
      data.copy(expected, i * MiB);
      return client.write(i * MiB, data);
    });
    // every write has reached the fast disk and waits at the gate with its payload
    await gate.waitingCount(8);
    assert.equal(pool.stats().released, round * 8, 'no payload goes back while a child still holds it');
    gate.openAll();
    await Promise.all(writes);
  }
  assert.ok(pool.stats().reused > 0, `the pool reused buffers (${JSON.stringify(pool.stats())})`);
  assert.ok((await graph.getNode('fast').read(0, size)).equals(expected), 'the fast child holds exactly what was written');
  assert.ok((await graph.getNode('slow').read(0, size)).equals(expected), 'the late child holds exactly what was written');
});
