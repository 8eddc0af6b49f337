// The server's connections read into one reused buffer (src/nbd/server/read-buffer.ts, issue
// 14): no new buffer per socket read, whose external memory started the daemons' major GCs.
// The parser must then copy whatever it keeps of a read before the next one overwrites it: a
// header split across reads, a small payload that arrived whole, the start of a large one.
// Every write must land exactly, over a Unix socket and TCP, in every header mode.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, ftruncateSync, openSync } from 'node:fs';
import { createConnection, createServer, type Socket } from 'node:net';
import { join } from 'node:path';
import { NbdClient } from '../../../src/nbd/client/client.js';
import { NbdServer } from '../../../src/nbd/server/server.js';
import { ByteQueue } from '../../../src/nbd/codec.js';
import { READ_BUFFER_BYTES, readIntoReusedBuffer } from '../../../src/nbd/server/read-buffer.js';
import type { SocketAddress } from '../../../src/util/socket-address.js';
import { newGraph, tempDir } from '../../helpers/graph.js';
import { patterned } from '../helpers.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 24 * MiB;

async function serve(t: { after(fn: () => unknown): void }, unix: boolean): Promise<{ server: NbdServer; addr: SocketAddress }> {
  const dir = tempDir(t);
  const file = join(dir, 'disk.raw');
  const fd = openSync(file, 'w');
  ftruncateSync(fd, SIZE);
  closeSync(fd);
  const graph = newGraph();
  const node = await graph.open({ driver: 'raw', 'node-name': 'disk', file: { driver: 'file', filename: file } }, { monitorOwned: true });
  const server = new NbdServer({ graph });
  const addr = await server.listen(unix ? { type: 'unix', path: join(dir, 'nbd.sock') } : { type: 'inet', host: '127.0.0.1', port: 0 });
  server.addExport({ name: 'disk0', node, writable: true });
  t.after(async () => {
    await server.close();
    await graph.closeAll();
  });
  return { server, addr };
}

/** the server's live transmissions (a private set: what this test checks is the path taken) */
function transmissions(server: NbdServer): Array<{ readsIntoReusedBuffer: boolean }> {
  const conns = (server as unknown as { connections: Set<{ transmission: { readsIntoReusedBuffer: boolean } | null }> }).connections;
  return [...conns].flatMap((c) => (c.transmission ? [c.transmission] : []));
}

for (const unix of [true, false]) {
  for (const extendedHeaders of [false, true]) {
    test(`pipelined writes of every size land exactly with reads into one reused buffer (${unix ? 'unix' : 'tcp'}, ${extendedHeaders ? 'extended' : 'compact'} headers)`, async (t) => {
      const { server, addr } = await serve(t, unix);
      const c = await NbdClient.connect({ address: addr, exportName: 'disk0', structuredReplies: true, extendedHeaders });
      t.after(() => c.destroy());
      // around the read buffer (64 KiB, so that headers fall across reads), the slab's
      // whole-payload limit (64 KiB), the assembly threshold (256 KiB) and beyond
      const R = READ_BUFFER_BYTES;
      const sizes = [1, 7, 511, 4 * KiB, 40 * KiB, 64 * KiB - 1, R - 20, R, R + 3, 100 * KiB, 255 * KiB, 256 * KiB, 300 * KiB + 5, MiB + 9];
      const expected = Buffer.alloc(SIZE);
      for (let wave = 0; wave < 4; wave++) {
        // disjoint places, all in flight at once, each wave on the same places as the last
        let at = 0;
        const writes = sizes.concat(sizes).map((len, i) => {
          const data = patterned(len, 1 + wave * 100 + i);
          const w = { at, data };
          at += len + 4096 + wave;
          return w;
        });
        assert.ok(at <= SIZE);
        await Promise.all(writes.map((w) => c.write(w.at, w.data)));
        for (const w of writes) w.data.copy(expected, w.at);
        assert.deepEqual(
          transmissions(server).map((x) => x.readsIntoReusedBuffer),
          [true],
          'the connection reads into the reused buffer',
        );
        const got = await c.read(0, at);
        assert.equal(Buffer.compare(got, expected.subarray(0, at)), 0, `wave ${wave}: the disk holds exactly what was written`);
      }
      await c.disconnect();
    });
  }
}

test('an accepted plain socket reads into one buffer; its reads arrive in order and pause/resume still work', async (t) => {
  let accepted!: Socket;
  const srv = createServer((s) => (accepted = s));
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', () => r()));
  t.after(() => srv.close());
  const client = createConnection((srv.address() as { port: number }).port, '127.0.0.1');
  t.after(() => client.destroy());
  await new Promise<void>((r) => client.once('connect', () => r()));
  while (!accepted) await new Promise((r) => setTimeout(r, 5));
  const got: Buffer[] = [];
  let views = new Set<ArrayBufferLike>();
  assert.equal(
    readIntoReusedBuffer(accepted, (bytes) => {
      views.add(bytes.buffer);
      got.push(Buffer.from(bytes));
    }),
    true,
  );
  accepted.resume();
  const sent = patterned(3 * MiB + 17, 9);
  client.write(sent.subarray(0, MiB));
  while (got.reduce((n, b) => n + b.length, 0) < MiB) await new Promise((r) => setTimeout(r, 5));
  // paused: nothing more arrives until resumed
  accepted.pause();
  const before = got.length;
  client.write(sent.subarray(MiB));
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(got.length, before, 'no read while paused');
  accepted.resume();
  while (got.reduce((n, b) => n + b.length, 0) < sent.length) await new Promise((r) => setTimeout(r, 5));
  assert.equal(Buffer.compare(Buffer.concat(got), sent), 0);
  assert.equal(views.size, 1, 'every read landed in the same buffer');
  views = new Set();
});

test('a queue over a reused read buffer hands out copies and keeps a copy of what is left', () => {
  const q = new ByteQueue();
  q.copyOut = (n) => Buffer.alloc(n);
  const read = Buffer.from('headerPAYLOADrest');
  q.push(read);
  const header = q.take(6);
  const payload = q.take(7);
  q.retain(read);
  read.fill(0x78); // the next socket read overwrites the buffer
  assert.equal(header.toString(), 'header');
  assert.equal(payload.toString(), 'PAYLOAD');
  assert.equal(q.length, 4);
  assert.equal(q.take(4).toString(), 'rest');
});
