import { test } from 'node:test';
import { spawnSync } from 'node:child_process';
import { lstatSync, readFileSync, writeFileSync } from 'node:fs';
import assert from 'node:assert/strict';
import { NbdClient } from '../../src/nbd/client/client.js';
import { NbdServer } from '../../src/nbd/server/server.js';
import { BlockError, StateError } from '../../src/errors.js';
import { CMD, CMD_FLAG, STATE_HOLE, STATE_ZERO, TFLAG } from '../../src/nbd/protocol.js';
import { loadTlsCreds, serverTlsConfig, clientTlsConfig } from '../../src/nbd/tls.js';
import { makeCerts, haveOpenssl } from './tls-certs.js';
import { patterned, serveMemory } from './helpers.js';
import { newGraph, tempDir } from '../helpers/graph.js';
import { BlockGraph } from '../../src/block/graph.js';
import { createRegistry } from '../../src/block/registry.js';
import { gateDriver, gateControl } from '../helpers/gate-driver.js';

const isCode = (code: string) => (e: unknown) => e instanceof BlockError && e.code === code;

test('many pipelined requests from several connections land exactly', async (t) => {
  const s = await serveMemory(t, { size: 8 << 20 });
  const clients = await Promise.all([0, 1, 2].map(() => NbdClient.connect({ address: s.tcp, exportName: 'disk0' })));
  t.after(() => clients.forEach((c) => c.destroy()));
  const expected = Buffer.alloc(8 << 20);
  const writes: Promise<void>[] = [];
  // 3 clients x 128 writes of 16 KiB at distinct offsets, all in flight at once
  clients.forEach((c, ci) => {
    for (let i = 0; i < 128; i++) {
      const off = (ci * 128 + i) * 16384;
      const d = patterned(16384, ci * 1000 + i + 1);
      d.copy(expected, off);
      writes.push(c.write(off, d));
    }
  });
  await Promise.all(writes);
  const reads = await Promise.all(Array.from({ length: 64 }, (_, i) => clients[i % 3]!.read(i * 98304, 98304)));
  assert.ok(Buffer.concat(reads).equals(expected.subarray(0, 64 * 98304)));
  assert.ok((await s.node.read(0, 8 << 20)).equals(expected));
  assert.equal(s.server.exports[0]!.connections, 3);
  await Promise.all(clients.map((c) => c.disconnect()));
});

test('LIST, INFO and several exports with their own flags', async (t) => {
  const s = await serveMemory(t, { size: 1 << 20 });
  const ro = await s.graph.open({ driver: 'memory', size: 65536, 'node-name': 'ro', 'read-only': true });
  await ro.setReadOnly(false);
  await ro.write(0, Buffer.alloc(65536, 0x5a));
  await ro.setReadOnly(true);
  s.server.addExport({ name: 'golden', node: 'ro', description: 'read-only copy' });
  const list = await NbdClient.list({ address: s.unix });
  assert.deepEqual(list, [
    { name: 'disk0', description: 'test disk' },
    { name: 'golden', description: 'read-only copy' },
  ]);
  const c = await NbdClient.connect({ address: s.unix, exportName: 'golden' });
  t.after(() => c.destroy());
  assert.equal(c.info.size, 65536);
  assert.ok(c.has(TFLAG.READ_ONLY) && c.has(TFLAG.CAN_MULTI_CONN) && !c.has(TFLAG.SEND_TRIM));
  assert.ok((await c.read(0, 65536)).equals(Buffer.alloc(65536, 0x5a)));
  await assert.rejects(c.write(0, Buffer.alloc(1)), isCode('EPERM'));
  await assert.rejects(c.rawRequest(CMD.WRITE_ZEROES, 0, 0, 512), isCode('EPERM'));
  assert.ok((await c.read(0, 1)).equals(Buffer.from([0x5a])));
  const w = await NbdClient.connect({ address: s.unix, exportName: 'disk0' });
  t.after(() => w.destroy());
  assert.ok(!w.has(TFLAG.CAN_MULTI_CONN), 'writable exports do not advertise multi-conn by default');
  await assert.rejects(NbdClient.connect({ address: s.unix, exportName: 'nope' }), isCode('ENOENT'));
  assert.throws(() => s.server.addExport({ name: 'golden', node: 'ro' }), /already in use/);
  assert.throws(() => s.server.addExport({ name: 'x', node: 'ro', writable: true }), /read-only/);
  assert.throws(() => s.server.addExport({ name: 'y', node: 'missing' }), /Cannot find/);
});

test('a client without structured replies gets simple replies', async (t) => {
  const s = await serveMemory(t, { size: 1 << 20 });
  const c = await NbdClient.connect({ address: s.tcp, exportName: 'disk0', structuredReplies: false });
  t.after(() => c.destroy());
  assert.equal(c.info.structuredReplies, false);
  assert.equal(c.info.baseAllocationId, null);
  assert.ok(!c.has(TFLAG.SEND_DF));
  const d = patterned(70000, 4);
  await c.write(1000, d);
  assert.ok((await c.read(1000, 70000)).equals(d));
  await assert.rejects(c.rawRequest(CMD.READ, CMD_FLAG.DF, 0, 10), isCode('EINVAL'));
  await assert.rejects(c.rawRequest(CMD.READ, 0, 1 << 20, 1), isCode('EINVAL'));
  await assert.rejects(c.blockStatus(0, 512), isCode('ENOTSUP'));
  assert.ok((await c.read(999, 2)).equals(Buffer.from([0, d[0]!])));
});

test('extended headers: 64-bit requests and replies with lockstep\'s own client', async (t) => {
  const s = await serveMemory(t, { size: 16 << 20 });
  const c = await NbdClient.connect({ address: s.tcp, exportName: 'disk0', extendedHeaders: true });
  t.after(() => c.destroy());
  assert.equal(c.info.extendedHeaders, true);
  assert.equal(c.info.structuredReplies, true);
  const d = patterned(3 << 20, 11);
  await c.write(5 << 20, d, { fua: true });
  assert.ok((await c.read(5 << 20, 3 << 20)).equals(d));
  assert.ok((await c.read(0, 1 << 20)).equals(Buffer.alloc(1 << 20)));
  assert.deepEqual(await c.blockStatus(0, 16 << 20), [
    { length: 5 << 20, flags: STATE_HOLE | STATE_ZERO },
    { length: 3 << 20, flags: 0 },
    { length: 8 << 20, flags: STATE_HOLE | STATE_ZERO },
  ]);
  assert.deepEqual(await c.blockStatus(0, 16 << 20, { reqOne: true }), [{ length: 5 << 20, flags: STATE_HOLE | STATE_ZERO }]);
  await c.writeZeroes(5 << 20, 1 << 20, { fastZero: true });
  await assert.rejects(c.rawRequest(CMD.READ, 0, 16 << 20, 1), isCode('EINVAL'));
  const expected = Buffer.from(d);
  expected.fill(0, 0, 1 << 20);
  assert.ok((await s.node.read(5 << 20, 3 << 20)).equals(expected));
  await c.disconnect();
});

test('a fenced backend fails writes with EIO and keeps serving reads', async (t) => {
  const s = await serveMemory(t, { size: 1 << 20 });
  const c = await NbdClient.connect({ address: s.tcp, exportName: 'disk0' });
  t.after(() => c.destroy());
  await c.write(0, Buffer.alloc(4096, 1));
  s.node.backends().find((b) => b.user)!.fenced = true;
  await assert.rejects(c.write(0, Buffer.alloc(4096, 2)), isCode('EIO'));
  await assert.rejects(c.writeZeroes(0, 4096), isCode('EIO'));
  assert.ok((await c.read(0, 4096)).equals(Buffer.alloc(4096, 1)));
});

test('removeExport: safe refuses while connected, hard drops clients with EIO', async (t) => {
  const s = await serveMemory(t, { size: 1 << 20 });
  const c = await NbdClient.connect({ address: s.tcp, exportName: 'disk0' });
  t.after(() => c.destroy());
  await assert.rejects(s.server.removeExport('disk0', 'safe'), StateError);
  await s.server.removeExport('disk0', 'hard');
  await assert.rejects(c.read(0, 512), isCode('EIO'));
  await assert.rejects(c.read(0, 512), isCode('EIO'));
  assert.deepEqual(s.server.exports, []);
  assert.equal(s.node.backends().length, 0, 'the export backend is released');
  await assert.rejects(NbdClient.connect({ address: s.tcp, exportName: 'disk0' }), isCode('ENOENT'));
  s.server.addExport({ name: 'disk0', node: 'disk', writable: true });
  const c2 = await NbdClient.connect({ address: s.tcp, exportName: 'disk0' });
  await c2.disconnect();
  await s.server.removeExport('disk0', 'safe');
});

test('maxConnections: connections past the limit are refused, the others keep working', async (t) => {
  const s = await serveMemory(t, { size: 1 << 20, server: { maxConnections: 2 } });
  const a = await NbdClient.connect({ address: s.tcp, exportName: 'disk0' });
  const b = await NbdClient.connect({ address: s.tcp, exportName: 'disk0' });
  t.after(() => (a.destroy(), b.destroy()));
  await assert.rejects(NbdClient.connect({ address: s.tcp, exportName: 'disk0' }), isCode('EIO'));
  await a.write(0, Buffer.alloc(10, 3));
  assert.ok((await b.read(0, 10)).equals(Buffer.alloc(10, 3)));
});

test('maxConnections 0 means unlimited, as in QEMU: more clients than the default cap of 100 all connect', async (t) => {
  const s = await serveMemory(t, { size: 1 << 20, server: { maxConnections: 0 } });
  const clients: NbdClient[] = [];
  t.after(() => clients.forEach((c) => c.destroy()));
  for (let i = 0; i < 105; i++) clients.push(await NbdClient.connect({ address: s.tcp, exportName: 'disk0' }));
  await clients[104]!.write(0, Buffer.alloc(10, 7));
  assert.ok((await clients[0]!.read(0, 10)).equals(Buffer.alloc(10, 7)));
});

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

test('x-idle-timeout: at the cap, the connection idle longest makes room for a newcomer', async (t) => {
  const s = await serveMemory(t, { size: 1 << 20, server: { maxConnections: 2, idleTimeoutMs: 200 } });
  const a = await NbdClient.connect({ address: s.tcp, exportName: 'disk0' });
  const b = await NbdClient.connect({ address: s.tcp, exportName: 'disk0' });
  t.after(() => (a.destroy(), b.destroy()));
  let aClosed = false;
  void a.closed.then(() => (aClosed = true));
  await sleep(300); // both have now idled past the timeout; a the longest
  await b.write(0, Buffer.alloc(10, 5)); // b is active again
  await sleep(300);
  const c = await NbdClient.connect({ address: s.tcp, exportName: 'disk0' });
  t.after(() => c.destroy());
  await a.closed;
  assert.ok(aClosed, 'the connection idle longest was closed');
  assert.ok((await c.read(0, 10)).equals(Buffer.alloc(10, 5)), 'the newcomer is served');
  await b.write(10, Buffer.alloc(10, 6));
  assert.ok((await c.read(10, 10)).equals(Buffer.alloc(10, 6)), 'the other client keeps working');
  assert.equal(s.server.connectionCount, 2);
});

test('x-idle-timeout: a newcomer is refused while no client has idled long enough', async (t) => {
  const s = await serveMemory(t, { size: 1 << 20, server: { maxConnections: 1, idleTimeoutMs: 60_000 } });
  const a = await NbdClient.connect({ address: s.tcp, exportName: 'disk0' });
  t.after(() => a.destroy());
  await assert.rejects(NbdClient.connect({ address: s.tcp, exportName: 'disk0' }), isCode('EIO'));
  await a.write(0, Buffer.alloc(10, 1));
});

test('x-idle-timeout 0: idle clients are never closed, newcomers at the cap are refused', async (t) => {
  const s = await serveMemory(t, { size: 1 << 20, server: { maxConnections: 1, idleTimeoutMs: 0 } });
  const a = await NbdClient.connect({ address: s.tcp, exportName: 'disk0' });
  t.after(() => a.destroy());
  await sleep(50);
  await assert.rejects(NbdClient.connect({ address: s.tcp, exportName: 'disk0' }), isCode('EIO'));
  assert.ok((await a.read(0, 10)).equals(Buffer.alloc(10)));
  assert.throws(() => new NbdServer({ graph: newGraph(), idleTimeoutMs: -1 }), /x-idle-timeout must be a non-negative number/);
});

test('x-idle-timeout: a client with a request in flight is never chosen, however long ago it last sent', async (t) => {
  const graph = new BlockGraph(createRegistry([gateDriver]));
  const node = await graph.open({ driver: 'test-gate', 'node-name': 'gate', file: { driver: 'memory', size: 1 << 20 } }, { monitorOwned: true });
  const server = new NbdServer({ graph, maxConnections: 2, idleTimeoutMs: 200 });
  const tcp = (await server.listen({ type: 'inet', host: '127.0.0.1', port: 0 })) as { type: 'inet'; host: string; port: number };
  server.addExport({ name: 'disk0', node, writable: true });
  t.after(async () => {
    gateControl(node).openAll();
    await server.close();
    await graph.closeAll();
  });
  const gate = gateControl(node);
  gate.closed = true;
  const busy = await NbdClient.connect({ address: tcp, exportName: 'disk0' });
  t.after(() => busy.destroy());
  const pending = busy.write(0, Buffer.alloc(512, 9));
  await gate.waitingCount(1); // busy's write is in flight, held at the gate
  const idle = await NbdClient.connect({ address: tcp, exportName: 'disk0' });
  t.after(() => idle.destroy());
  await sleep(300); // both past the timeout; busy has been silent the longest
  const c = await NbdClient.connect({ address: tcp, exportName: 'disk0' });
  t.after(() => c.destroy());
  await idle.closed;
  await assert.rejects(idle.read(0, 1), isCode('EIO'));
  gate.openAll();
  await pending;
  assert.ok((await c.read(0, 512)).equals(Buffer.alloc(512, 9)), 'the busy client\'s write completed and the newcomer reads it');
  assert.ok((await busy.read(0, 512)).equals(Buffer.alloc(512, 9)));
});

test('server close drains in-flight requests, then clients see EIO', async (t) => {
  const s = await serveMemory(t, { size: 4 << 20 });
  const c = await NbdClient.connect({ address: s.tcp, exportName: 'disk0' });
  t.after(() => c.destroy());
  const writes = Array.from({ length: 32 }, (_, i) => c.write(i * 65536, Buffer.alloc(65536, i + 1)));
  await Promise.all(writes);
  await s.server.close();
  await assert.rejects(c.read(0, 1), isCode('EIO'));
  assert.ok((await s.node.read(31 * 65536, 65536)).equals(Buffer.alloc(65536, 32)));
});

test('TLS: x509 credentials from QEMU-style dirs, required before any export is visible', async (t) => {
  if (!haveOpenssl()) {
    if (process.env.CI) assert.fail('openssl is required in CI');
    t.skip('openssl not installed');
    return;
  }
  const dir = tempDir(t, 'lockstep-tls-');
  const { serverDir, clientDir, otherCaDir } = makeCerts(dir);
  const graph = newGraph();
  const node = await graph.open({ driver: 'memory', size: 1 << 20, 'node-name': 'disk' });
  const server = new NbdServer({ graph, tls: serverTlsConfig(loadTlsCreds({ id: 'tls0', endpoint: 'server', dir: serverDir, verifyPeer: true })) });
  t.after(async () => {
    await server.close();
    await graph.closeAll();
  });
  const address = await server.listen({ type: 'inet', host: '127.0.0.1', port: 0 });
  server.addExport({ name: 'secret', node, writable: true });
  const clientCreds = loadTlsCreds({ id: 'tls1', endpoint: 'client', dir: clientDir });

  // clear text: not even the list is visible
  await assert.rejects(NbdClient.list({ address }), isCode('EPERM'));
  await assert.rejects(NbdClient.connect({ address, exportName: 'secret' }), isCode('EPERM'));
  // wrong CA: the client refuses the server
  await assert.rejects(NbdClient.connect({ address, exportName: 'secret', tls: clientTlsConfig(loadTlsCreds({ id: 'x', dir: otherCaDir })) }), /TLS handshake failed/);
  // no client certificate while the server verifies peers
  await assert.rejects(NbdClient.connect({ address, exportName: 'secret', tls: { ca: clientCreds.ca! } }));

  const c = await NbdClient.connect({ address, exportName: 'secret', tls: clientTlsConfig(clientCreds) });
  t.after(() => c.destroy());
  assert.equal(c.info.tls, true);
  const d = patterned(200000, 2);
  await c.write(4096, d);
  assert.ok((await c.read(4096, 200000)).equals(d));
  assert.deepEqual(await NbdClient.list({ address, tls: clientTlsConfig(clientCreds) }), [{ name: 'secret', description: '' }]);
  await c.disconnect();
});

test('a socket left at the listen path by a killed server is replaced (as QEMU does); a regular file there is not touched', async (t) => {
  const dir = tempDir(t);
  const path = `${dir}/nbd.sock`;
  // a process that listens there and dies without removing its socket
  const r = spawnSync(process.execPath, ['-e', `require('net').createServer().listen(${JSON.stringify(path)}, () => process.kill(process.pid, 'SIGKILL'))`]);
  assert.equal(r.signal, 'SIGKILL');
  assert.ok(lstatSync(path).isSocket(), 'the stale socket is there');
  const graph = newGraph();
  const node = await graph.open({ driver: 'memory', size: 65536, 'node-name': 'disk0' }, { monitorOwned: true });
  const server = new NbdServer({ graph });
  t.after(async () => {
    await server.close();
    await graph.closeAll();
  });
  await server.listen({ type: 'unix', path });
  server.addExport({ name: 'disk0', node, writable: true });
  const c = await NbdClient.connect({ address: { type: 'unix', path }, exportName: 'disk0' });
  await c.write(0, Buffer.alloc(512, 7));
  assert.ok((await c.read(0, 512)).equals(Buffer.alloc(512, 7)));
  await c.disconnect();

  const file = `${dir}/not-a-socket`;
  writeFileSync(file, 'data');
  const other = new NbdServer({ graph: newGraph() });
  await assert.rejects(other.listen({ type: 'unix', path: file }), /Failed to listen on .*not-a-socket/);
  assert.equal(readFileSync(file, 'utf8'), 'data');
  await other.close();
});
