// The server caps in-flight requests per connection: a client that pipelines far more
// requests than the cap sees at most `maxInFlight` of them reach the node at once.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BlockGraph } from '../../src/block/graph.js';
import { createRegistry } from '../../src/block/registry.js';
import { makeCaps, type BlockDriver } from '../../src/block/driver.js';
import { MemoryStore } from '../../src/block/drivers/memory.js';
import { NbdServer } from '../../src/nbd/server/server.js';
import { NbdClient } from '../../src/nbd/client/client.js';

/** A memory disk whose writes wait until the test opens the gate. */
function gateDriver(gate: { open: boolean; waiters: Array<() => void>; active: number; peak: number }): BlockDriver {
  return {
    name: 'gate',
    kind: 'protocol',
    async open(_ctx, o) {
      const store = new MemoryStore(o.size('size', true));
      o.done();
      return {
        caps: makeCaps({}),
        getLength: () => store.size,
        read: async (off, len) => store.read(off, len),
        write: async (off, data) => {
          gate.active++;
          gate.peak = Math.max(gate.peak, gate.active);
          const copy = Buffer.from(data);
          if (!gate.open) await new Promise<void>((r) => gate.waiters.push(r));
          store.write(off, copy);
          gate.active--;
        },
        close: async () => {},
      };
    },
  };
}

test('a connection never has more than maxInFlight requests on the node; the rest wait in the socket', async (t) => {
  const gate = { open: false, waiters: [] as Array<() => void>, active: 0, peak: 0 };
  const graph = new BlockGraph(createRegistry([gateDriver(gate)]));
  const node = await graph.open({ driver: 'gate', size: 8 << 20 });
  const server = new NbdServer({ graph, maxInFlight: 4 });
  t.after(async () => {
    await server.close();
    await graph.closeAll();
  });
  const address = await server.listen({ type: 'inet', host: '127.0.0.1', port: 0 });
  server.addExport({ name: 'g', node, writable: true });
  const c = await NbdClient.connect({ address, exportName: 'g', maxInFlight: 200 });
  t.after(() => c.destroy());
  const writes = Array.from({ length: 200 }, (_, i) => c.write(i * 4096, Buffer.alloc(4096, (i % 250) + 1)));
  // wait until the server has taken as many as it will take
  for (let i = 0; i < 200 && gate.waiters.length < 4; i++) await new Promise((r) => setTimeout(r, 10));
  assert.equal(gate.waiters.length, 4);
  assert.equal(c.inFlight, 200, 'the client has all 200 on the wire');
  // let a few turns of the event loop pass: still no more than 4 reach the node
  for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
  assert.equal(gate.active, 4);
  gate.open = true;
  for (const w of gate.waiters.splice(0)) w();
  await Promise.all(writes);
  assert.equal(gate.peak, 4);
  for (let i = 0; i < 200; i += 37) assert.ok((await c.read(i * 4096, 4096)).equals(Buffer.alloc(4096, (i % 250) + 1)));
});

test('server close after a client vanished with requests in flight still completes', { timeout: 20_000 }, async (t) => {
  const gate = { open: false, waiters: [] as Array<() => void>, active: 0, peak: 0 };
  const graph = new BlockGraph(createRegistry([gateDriver(gate)]));
  t.after(() => graph.closeAll());
  const node = await graph.open({ driver: 'gate', size: 1 << 20 });
  const server = new NbdServer({ graph, maxInFlight: 4 });
  const address = await server.listen({ type: 'inet', host: '127.0.0.1', port: 0 });
  server.addExport({ name: 'g', node, writable: true });
  const c = await NbdClient.connect({ address, exportName: 'g' });
  const writes = Array.from({ length: 10 }, (_, i) => c.write(i * 512, Buffer.alloc(512, 1)).catch((e: unknown) => e));
  for (let i = 0; i < 200 && gate.waiters.length < 4; i++) await new Promise((r) => setTimeout(r, 10));
  assert.equal(gate.waiters.length, 4);
  c.destroy();
  // let the server see the connection drop before it is asked to shut down
  for (let i = 0; i < 5; i++) await new Promise((r) => setTimeout(r, 10));
  const closing = server.close();
  gate.open = true;
  for (const w of gate.waiters.splice(0)) w();
  await closing;
  assert.equal(server.connectionCount, 0);
  assert.equal((await Promise.all(writes)).every((e) => e instanceof Error), true);
});
