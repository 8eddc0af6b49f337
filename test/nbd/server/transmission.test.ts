// The server's read path for nodes that read into the caller's buffer (a file, raw over a
// file): small replies are gathered into one socket write per event-loop turn from reusable
// scratch buffers, large reads are split into hole and data chunks by block status, small
// ones are not (issue 18). Every reply must carry exactly the node's bytes whatever mix of
// sizes is in flight, in every reply mode.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, ftruncateSync, openSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { NbdClient } from '../../../src/nbd/client/client.js';
import { NbdServer } from '../../../src/nbd/server/server.js';
import { PayloadPool } from '../../../src/nbd/server/payload-pool.js';
import type { BlockNode } from '../../../src/block/node.js';
import type { SocketAddress } from '../../../src/util/socket-address.js';
import { newGraph, tempDir } from '../../helpers/graph.js';
import { patterned } from '../helpers.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 4 * MiB;

async function serveFile(t: { after(fn: () => unknown): void }, payloadPool?: PayloadPool): Promise<{ node: BlockNode; addr: SocketAddress; content: Buffer }> {
  const dir = tempDir(t);
  const file = join(dir, 'disk.raw');
  // data in the first and last MiB, a hole (never written) between
  const content = Buffer.alloc(SIZE);
  patterned(MiB, 3).copy(content, 0);
  patterned(MiB, 5).copy(content, 3 * MiB);
  const fd = openSync(file, 'w');
  ftruncateSync(fd, SIZE);
  writeSync(fd, content, 0, MiB, 0);
  writeSync(fd, content, 3 * MiB, MiB, 3 * MiB);
  closeSync(fd);
  const graph = newGraph();
  const node = await graph.open({ driver: 'raw', 'node-name': 'disk', file: { driver: 'file', filename: file } }, { monitorOwned: true });
  const server = new NbdServer(payloadPool ? { graph, payloadPool } : { graph });
  const addr = await server.listen({ type: 'inet', host: '127.0.0.1', port: 0 });
  server.addExport({ name: 'disk0', node, writable: true });
  t.after(async () => {
    await server.close();
    await graph.closeAll();
  });
  assert.ok(node.readsInto, 'the export reads into buffers itself (the path under test)');
  return { node, addr, content };
}

const MODES = [
  { name: 'simple', structuredReplies: false },
  { name: 'structured', structuredReplies: true },
  { name: 'extended', structuredReplies: true, extendedHeaders: true },
] as const;

for (const mode of MODES) {
  test(`mixed read sizes in flight together come back exact (${mode.name} replies)`, async (t) => {
    const { addr, content } = await serveFile(t);
    const c = await NbdClient.connect({ address: addr, exportName: 'disk0', structuredReplies: mode.structuredReplies, extendedHeaders: 'extendedHeaders' in mode });
    t.after(() => c.destroy());
    // around the scratch size (16 KiB + header), the sparse-read threshold (64 KiB) and
    // across the data/hole boundaries; waves of 96 so that scratch buffers are reused
    const sizes = [1, 511, 4 * KiB, 16 * KiB - 1, 16 * KiB, 16 * KiB + 40, 16 * KiB + 41, 40 * KiB, 64 * KiB - 1, 64 * KiB, 200 * KiB];
    let seed = 7;
    const rnd = (n: number): number => {
      seed = (seed * 1103515245 + 12345) % 2147483648;
      return seed % n;
    };
    for (let wave = 0; wave < 6; wave++) {
      const reqs = Array.from({ length: 96 }, (_, i) => {
        const len = sizes[(i + wave) % sizes.length]!;
        const boundary = [MiB, 3 * MiB][i % 2]!;
        // half of them straddle a data/hole boundary
        const off = i % 4 < 2 ? Math.max(0, boundary - rnd(len)) : rnd(SIZE - len);
        return { off, len };
      });
      const got = await Promise.all(reqs.map(({ off, len }) => c.read(off, len)));
      got.forEach((b, i) => {
        const { off, len } = reqs[i]!;
        assert.equal(Buffer.compare(b, content.subarray(off, off + len)), 0, `wave ${wave}: read of ${len} at ${off}`);
      });
      // writes in between change what the next wave reads
      const w = patterned(8 * KiB, wave + 20);
      const at = rnd(SIZE - w.length);
      await c.write(at, w);
      w.copy(content, at);
    }
    await c.disconnect();
  });
}

test('a small read is sent without a block status call; a large one still asks and gets the hole as zeroes', async (t) => {
  const { node, addr } = await serveFile(t);
  let calls = 0;
  const orig = node.blockStatus.bind(node);
  node.blockStatus = (offset: number, length: number) => {
    calls++;
    return orig(offset, length);
  };
  const c = await NbdClient.connect({ address: addr, exportName: 'disk0' });
  t.after(() => c.destroy());
  assert.ok((await c.read(2 * MiB, 4 * KiB)).equals(Buffer.alloc(4 * KiB)));
  assert.ok((await c.read(MiB - 512, 4 * KiB)).subarray(512).equals(Buffer.alloc(3584)));
  assert.equal(calls, 0, 'no block status for reads under 64 KiB');
  const big = await c.read(MiB - 4 * KiB, 128 * KiB);
  assert.ok(big.subarray(4 * KiB).equals(Buffer.alloc(124 * KiB)));
  assert.ok(calls > 0, 'block status for a read of 64 KiB or more');
  await c.disconnect();
});

// Large read replies come from the payload pool and go back once the socket has taken them:
// a poisoning pool shows a buffer given back too early as 0xdb bytes in a later reply.
for (const mode of MODES) {
  test(`large reads through a poisoning pool come back exact and reuse their buffers (${mode.name} replies)`, async (t) => {
    const pool = new PayloadPool({ poison: true });
    const { addr, content } = await serveFile(t, pool);
    const c = await NbdClient.connect({ address: addr, exportName: 'disk0', structuredReplies: mode.structuredReplies, extendedHeaders: 'extendedHeaders' in mode });
    t.after(() => c.destroy());
    const sizes = [64 * KiB, 200 * KiB, 256 * KiB, 256 * KiB + 1, MiB];
    for (let wave = 0; wave < 4; wave++) {
      const reqs = Array.from({ length: 24 }, (_, i) => {
        const len = sizes[(i + wave) % sizes.length]!;
        // across the data/hole boundaries and inside the data
        const off = i % 3 === 0 ? MiB - 100 * KiB : i % 3 === 1 ? 3 * MiB - 10 * KiB : (i * 37 * KiB) % (SIZE - len);
        return { off, len };
      });
      const got = await Promise.all(reqs.map(({ off, len }) => c.read(off, len)));
      got.forEach((b, i) => {
        const { off, len } = reqs[i]!;
        assert.equal(Buffer.compare(b, content.subarray(off, off + len)), 0, `wave ${wave}: read of ${len} at ${off}`);
      });
      const w = patterned(300 * KiB, wave + 40);
      const at = (wave * 700 * KiB) % (SIZE - w.length);
      await c.write(at, w);
      w.copy(content, at);
    }
    const st = pool.stats();
    assert.ok(st.reused > 0, `reply buffers were reused (${JSON.stringify(st)})`);
    await c.disconnect();
  });
}
