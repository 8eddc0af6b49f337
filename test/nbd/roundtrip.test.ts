import { test } from 'node:test';
import assert from 'node:assert/strict';
import { NbdClient } from '../../src/nbd/client/client.js';
import { BlockError } from '../../src/errors.js';
import { STATE_HOLE, STATE_ZERO, TFLAG } from '../../src/nbd/protocol.js';
import { patterned, serveMemory } from './helpers.js';

for (const transport of ['tcp', 'unix'] as const) {
  test(`write, read back, zero, trim and block status over ${transport}`, async (t) => {
    const s = await serveMemory(t, { size: 4 << 20 });
    const c = await NbdClient.connect({ address: s[transport], exportName: 'disk0' });
    t.after(() => c.destroy());
    assert.equal(c.info.size, 4 << 20);
    assert.equal(c.info.structuredReplies, true);
    assert.notEqual(c.info.baseAllocationId, null);
    assert.equal(c.info.description, 'test disk');
    assert.ok(c.has(TFLAG.SEND_FLUSH) && c.has(TFLAG.SEND_FUA) && c.has(TFLAG.SEND_TRIM) && c.has(TFLAG.SEND_WRITE_ZEROES));
    assert.ok(!c.has(TFLAG.READ_ONLY));

    const data = patterned(1 << 20, 7);
    await c.write(65536, data, { fua: true });
    assert.ok((await c.read(65536, 1 << 20)).equals(data));
    // a read spanning a hole, data, and a hole
    const all = await c.read(0, 2 << 20);
    const expected = Buffer.alloc(2 << 20);
    data.copy(expected, 65536);
    assert.ok(all.equals(expected));
    // server-side bytes are exactly what was written
    assert.ok((await s.node.read(65536, 1 << 20)).equals(data));

    assert.deepEqual(await c.blockStatus(0, 4 << 20), [
      { length: 65536, flags: STATE_HOLE | STATE_ZERO },
      { length: 1 << 20, flags: 0 },
      { length: (4 << 20) - 65536 - (1 << 20), flags: STATE_HOLE | STATE_ZERO },
    ]);

    await c.writeZeroes(65536, 65536);
    await c.trim(131072, 65536);
    await c.flush();
    const after = await c.read(65536, 1 << 20);
    const exp2 = Buffer.from(data);
    exp2.fill(0, 0, 131072);
    assert.ok(after.equals(exp2));
    await c.disconnect();
    assert.equal(c.connectionState, 'closed');
  });
}

test('requests past the end fail with EINVAL and the connection stays usable', async (t) => {
  const s = await serveMemory(t, { size: 1 << 20 });
  const c = await NbdClient.connect({ address: s.tcp, exportName: 'disk0' });
  t.after(() => c.destroy());
  const { CMD } = await import('../../src/nbd/protocol.js');
  await assert.rejects(c.rawRequest(CMD.READ, 0, (1 << 20) - 10, 20), (e: unknown) => e instanceof BlockError && e.code === 'EINVAL');
  await assert.rejects(c.rawRequest(CMD.WRITE, 0, (1 << 20) - 1, 2, Buffer.alloc(2, 9)), (e: unknown) => e instanceof BlockError && e.code === 'EINVAL');
  await assert.rejects(c.rawRequest(CMD.WRITE_ZEROES, 0x40, 0, 512), (e: unknown) => e instanceof BlockError && e.code === 'EINVAL');
  await assert.rejects(c.rawRequest(77, 0, 0, 512), (e: unknown) => e instanceof BlockError && e.code === 'EINVAL');
  assert.ok((await c.read(0, 512)).equals(Buffer.alloc(512)));
  assert.ok((await s.node.read((1 << 20) - 1, 1)).equals(Buffer.alloc(1)));
});
