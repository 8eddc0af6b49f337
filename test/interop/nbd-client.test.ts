// lockstep's NBD client (NbdClient and the nbd driver) against qemu-nbd and nbdkit.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { requireTools, start, waitFor } from './tools.js';
import { newGraph, tempDir } from '../helpers/graph.js';
import { patterned } from '../nbd/helpers.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import { STATE_HOLE, STATE_ZERO, TFLAG } from '../../src/nbd/protocol.js';

const MiB = 1 << 20;

test('NbdClient against qemu-nbd: structured replies, block status, writes reach the file', async (t) => {
  if (!requireTools(t, 'qemu-nbd')) return;
  const dir = tempDir(t, 'lockstep-qnbd-');
  const img = join(dir, 'disk.raw');
  const initial = Buffer.alloc(8 * MiB);
  patterned(MiB, 9).copy(initial, 2 * MiB);
  writeFileSync(img, initial);
  const sock = join(dir, 'nbd.sock');
  start(t, 'qemu-nbd', ['-f', 'raw', '-x', 'exp', '-k', sock, '-t', '--cache=writeback', img]);
  await waitFor(() => existsSync(sock), 'qemu-nbd socket');
  const c = await NbdClient.connect({ address: { type: 'unix', path: sock }, exportName: 'exp' });
  t.after(() => c.destroy());
  assert.equal(c.info.size, 8 * MiB);
  assert.equal(c.info.structuredReplies, true);
  assert.notEqual(c.info.baseAllocationId, null);
  assert.ok((await c.read(0, 8 * MiB)).equals(initial));
  const d = patterned(3 * MiB + 123, 4);
  await c.write(4 * MiB + 1, d, { fua: true });
  await c.writeZeroes(2 * MiB, 4096);
  await c.flush();
  const expected = Buffer.from(initial);
  d.copy(expected, 4 * MiB + 1);
  expected.fill(0, 2 * MiB, 2 * MiB + 4096);
  assert.ok((await c.read(0, 8 * MiB)).equals(expected));
  const ext = await c.blockStatus(0, 8 * MiB);
  assert.ok(ext.length >= 1);
  assert.equal(ext.reduce((a, e) => a + e.length, 0) <= 8 * MiB, true);
  await c.disconnect();
  assert.ok(readFileSync(img).equals(expected));
});

test('the nbd driver against nbdkit memory: a graph node with holes from base:allocation', async (t) => {
  if (!requireTools(t, 'nbdkit')) return;
  const dir = tempDir(t, 'lockstep-nbdkit-');
  const sock = join(dir, 'nbdkit.sock');
  start(t, 'nbdkit', ['-f', '-U', sock, 'memory', '64M']);
  await waitFor(() => existsSync(sock), 'nbdkit socket');
  const g = newGraph();
  t.after(() => g.closeAll());
  const node = await g.open({ driver: 'nbd', 'node-name': 'remote', server: { type: 'unix', path: sock } });
  assert.equal(node.getLength(), 64 * MiB);
  assert.equal(node.caps.blockStatus, true);
  const be = g.createBackend(node);
  const d = patterned(5 * MiB, 12);
  await be.write(10 * MiB + 7, d);
  assert.ok((await be.read(10 * MiB + 7, 5 * MiB)).equals(d));
  const st = await be.blockStatus(0, 64 * MiB);
  assert.equal(st.zero, true);
  assert.equal(st.data, false);
  assert.ok(st.length <= 10 * MiB);
  const mid = await be.blockStatus(11 * MiB, MiB);
  assert.equal(mid.data, true);
  await be.writeZeroes(11 * MiB, MiB, { mayUnmap: true });
  const expected = Buffer.from(d);
  expected.fill(0, MiB - 7, 2 * MiB - 7);
  assert.ok((await be.read(10 * MiB + 7, 5 * MiB)).equals(expected));
  await be.flush();
  const raw = await NbdClient.connect({ address: { type: 'unix', path: sock } });
  t.after(() => raw.destroy());
  assert.ok(raw.has(TFLAG.SEND_TRIM));
  const ext = await raw.blockStatus(0, MiB);
  assert.equal(ext[0]!.flags, STATE_HOLE | STATE_ZERO);
  await raw.disconnect();
  await g.closeAll(); // disconnects the driver's client, so nbdkit can exit at once
});
