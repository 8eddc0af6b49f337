import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { newGraph, tempDir } from '../../helpers/graph.js';
import { patterned, serveMemory } from '../../nbd/helpers.js';
import { NbdServer } from '../../../src/nbd/server/server.js';
import { BlockError, InvalidArgumentError } from '../../../src/errors.js';
import { loadTlsCreds, serverTlsConfig } from '../../../src/nbd/tls.js';
import { haveOpenssl, makeCerts } from '../../nbd/tls-certs.js';
import { cuttableProxy } from '../../helpers/proxy.js';
import { ZERO_PIECE } from '../../../src/block/drivers/nbd.js';

const isCode = (code: string) => (e: unknown) => e instanceof BlockError && e.code === code;

test('an nbd node from keyval options reads and writes the remote export', async (t) => {
  const s = await serveMemory(t, { size: 2 << 20 });
  const g = newGraph();
  t.after(() => g.closeAll());
  const node = await g.open(
    { driver: 'nbd', 'node-name': 'remote', server: { type: 'inet', host: '127.0.0.1', port: String(s.tcp.port) }, export: 'disk0' },
    { keyval: true },
  );
  assert.equal(node.getLength(), 2 << 20);
  assert.equal(node.caps.fua && node.caps.writeZeroes && node.caps.discard && node.caps.blockStatus, true);
  const d = patterned(300000, 8);
  await node.write(12345, d, { fua: true });
  assert.ok((await node.read(12345, d.length)).equals(d));
  assert.ok((await s.node.read(12345, d.length)).equals(d));
  const st = await node.blockStatus(1 << 20, 1 << 20);
  assert.deepEqual([st.data, st.zero, st.length], [false, true, 1 << 20]);
  await node.writeZeroes(12345, 1000, { noFallback: true });
  assert.ok((await s.node.read(12345, 1000)).equals(Buffer.alloc(1000)));
  assert.match(node.filename, /^nbd:\/\/127\.0\.0\.1:\d+\/disk0$/);
});

test('bad nbd options are reported by name', async (t) => {
  const s = await serveMemory(t);
  const g = newGraph();
  t.after(() => g.closeAll());
  const cases: Array<[Record<string, unknown>, RegExp]> = [
    [{ driver: 'nbd' }, /Parameter 'server' is missing/],
    [{ driver: 'nbd', server: { host: 'x', port: '1' } }, /Parameter 'server.type' is missing/],
    [{ driver: 'nbd', server: { type: 'inet', host: '127.0.0.1', port: 'abc' } }, /server.port/],
    [{ driver: 'nbd', server: { type: 'unix', path: s.unix.path }, export: 'disk0', bogus: 1 }, /Parameter 'bogus' is unexpected/],
    [{ driver: 'nbd', server: { type: 'unix', path: s.unix.path }, 'tls-creds': 'nope' }, /No TLS credentials with id 'nope'/],
    [{ driver: 'nbd', server: { type: 'unix', path: s.unix.path }, export: 'missing' }, /Requested export not available/],
    [{ driver: 'nbd', server: { type: 'unix', path: join(s.dir, 'no.sock') } }, /Failed to connect/],
  ];
  g.objects.set('notcreds', { id: 'notcreds' });
  cases.push([{ driver: 'nbd', server: { type: 'unix', path: s.unix.path }, 'tls-creds': 'notcreds' }, /is not TLS credentials/]);
  for (const [opts, re] of cases) await assert.rejects(g.open(opts), (e: unknown) => e instanceof InvalidArgumentError && re.test(e.message));
  assert.equal(g.nodes.size, 0);
});

test('a read-only export cannot be opened read-write', async (t) => {
  const s = await serveMemory(t);
  s.server.addExport({ name: 'ro', node: 'disk' });
  const g = newGraph();
  t.after(() => g.closeAll());
  await assert.rejects(g.open({ driver: 'nbd', server: { type: 'unix', path: s.unix.path }, export: 'ro' }), /Read-only NBD export/);
  const n = await g.open({ driver: 'nbd', server: { type: 'unix', path: s.unix.path }, export: 'ro', 'read-only': true });
  assert.equal(n.getLength(), 1 << 20);
});

test('a lost connection fails requests with EIO at once without reconnect-delay', async (t) => {
  const s = await serveMemory(t);
  const g = newGraph();
  t.after(() => g.closeAll());
  const n = await g.open({ driver: 'nbd', server: { type: 'unix', path: s.unix.path }, export: 'disk0' });
  await n.write(0, Buffer.alloc(512, 1));
  await s.server.removeExport('disk0', 'hard');
  await assert.rejects(n.read(0, 512), isCode('EIO'));
  await assert.rejects(n.write(0, Buffer.alloc(512)), isCode('EIO'));
  await assert.rejects(n.flush(), isCode('EIO'));
});

test('reconnect-delay: requests wait for the reconnection and then succeed', async (t) => {
  const s = await serveMemory(t);
  const g = newGraph();
  t.after(() => g.closeAll());
  const n = await g.open({ driver: 'nbd', server: { type: 'unix', path: s.unix.path }, export: 'disk0', 'reconnect-delay': 20 });
  await n.write(0, Buffer.alloc(512, 7));
  await s.server.removeExport('disk0', 'hard');
  s.server.addExport({ name: 'disk0', node: 'disk', writable: true });
  const [r] = await Promise.all([n.read(0, 512), n.write(512, Buffer.alloc(512, 8))]);
  assert.ok(r.equals(Buffer.alloc(512, 7)));
  assert.ok((await s.node.read(512, 512)).equals(Buffer.alloc(512, 8)));
});

test('reconnect-delay runs out: requests fail with EIO instead of hanging', async (t) => {
  const s = await serveMemory(t);
  const g = newGraph();
  t.after(() => g.closeAll());
  const n = await g.open({ driver: 'nbd', server: { type: 'unix', path: s.unix.path }, export: 'disk0', 'reconnect-delay': 1 });
  await s.server.removeExport('disk0', 'hard');
  await assert.rejects(n.read(0, 512), isCode('EIO'));
});

test('x-io-timeout: a link that goes silent fails the outstanding requests with EIO', async (t) => {
  const s = await serveMemory(t);
  const proxy = await cuttableProxy(join(s.dir, 'proxy.sock'), s.unix.path);
  t.after(() => proxy.close());
  const g = newGraph();
  t.after(() => g.closeAll());
  const n = await g.open({ driver: 'nbd', server: { type: 'unix', path: proxy.path }, export: 'disk0', 'x-io-timeout': 1 });
  await n.write(0, Buffer.alloc(512, 3));
  proxy.cut();
  // without the timeout this write would wait for as long as the silent peer stays silent
  await assert.rejects(n.write(512, Buffer.alloc(512, 4)), (e: unknown) => isCode('EIO')(e) && /no reply from the NBD server/.test((e as Error).message));
  await assert.rejects(n.read(0, 512), isCode('EIO'));
  assert.ok((await s.node.read(0, 512)).equals(Buffer.alloc(512, 3)));
});

test('open-timeout retries until the server appears', async (t) => {
  const dir = tempDir(t, 'lockstep-nbd-open-');
  const path = join(dir, 'late.sock');
  const graph = newGraph();
  const disk = await graph.open({ driver: 'memory', size: 65536 });
  const server = new NbdServer({ graph });
  t.after(async () => {
    await server.close();
    await graph.closeAll();
  });
  setTimeout(() => {
    void server.listen({ type: 'unix', path }).then(() => server.addExport({ name: 'late', node: disk }));
  }, 300);
  const g = newGraph();
  t.after(() => g.closeAll());
  const n = await g.open({ driver: 'nbd', server: { type: 'unix', path }, export: 'late', 'open-timeout': 10, 'read-only': true });
  assert.equal(n.getLength(), 65536);
});

test('tls-creds names a tls-creds-x509 object in graph.objects', async (t) => {
  if (!haveOpenssl()) {
    if (process.env.CI) assert.fail('openssl is required in CI');
    t.skip('openssl not installed');
    return;
  }
  const dir = tempDir(t, 'lockstep-nbd-tls-');
  const { serverDir, clientDir } = makeCerts(dir);
  const s = await serveMemory(t, { server: { tls: serverTlsConfig(loadTlsCreds({ id: 's', endpoint: 'server', dir: serverDir, verifyPeer: false })) } });
  const g = newGraph();
  t.after(() => g.closeAll());
  await assert.rejects(g.open({ driver: 'nbd', server: { type: 'inet', host: '127.0.0.1', port: s.tcp.port }, export: 'disk0' }), /requires TLS/);
  g.objects.set('tls0', loadTlsCreds({ id: 'tls0', endpoint: 'client', dir: clientDir }));
  const n = await g.open({ driver: 'nbd', server: { type: 'inet', host: '127.0.0.1', port: s.tcp.port }, export: 'disk0', 'tls-creds': 'tls0' });
  await n.write(100, Buffer.from('secret'));
  assert.ok((await s.node.read(100, 6)).equals(Buffer.from('secret')));
  assert.throws(() => loadTlsCreds({ id: 'x', endpoint: 'server', dir: clientDir }), /server-cert.pem/);
});

test('a long write-zeroes or discard is sent as ZERO_PIECE requests, one after the other', async (t) => {
  const size = 2 * ZERO_PIECE + 4096 * 3;
  const s = await serveMemory(t, { size });
  const seen: Array<[string, number, number]> = [];
  let inFlight = 0;
  let most = 0;
  const impl = s.node.impl as { writeZeroes: (o: number, n: number, f: unknown) => Promise<void>; discard: (o: number, n: number) => Promise<void> };
  for (const op of ['writeZeroes', 'discard'] as const) {
    const orig = impl[op].bind(impl) as (o: number, n: number, f?: unknown) => Promise<void>;
    impl[op] = async (o: number, n: number, f?: unknown) => {
      seen.push([op, o, n]);
      most = Math.max(most, ++inFlight);
      try {
        await orig(o, n, f);
      } finally {
        inFlight--;
      }
    };
  }
  const g = newGraph();
  t.after(() => g.closeAll());
  const node = await g.open({ driver: 'nbd', 'node-name': 'remote', server: { type: 'unix', path: s.unix.path }, export: 'disk0' });
  await s.node.write(size - 4096, patterned(4096, 3));
  await node.writeZeroes(4096, size - 4096, { mayUnmap: true });
  await node.discard(0, size);
  const pieces = (op: string, from: number) => {
    const out: Array<[string, number, number]> = [];
    for (let o = from; o < size; o += ZERO_PIECE) out.push([op, o, Math.min(ZERO_PIECE, size - o)]);
    return out;
  };
  assert.deepEqual(seen, [...pieces('writeZeroes', 4096), ...pieces('discard', 0)]);
  assert.equal(most, 1, 'one piece at a time');
  assert.ok((await s.node.read(size - 4096, 4096)).equals(Buffer.alloc(4096)));
});
