// The replication filter's node: block status is its file's (the filter declares no block
// status of its own, so the node layer passes the question through, in either mode).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { primaryFixture } from '../../../helpers/replication.js';

const MiB = 1024 * 1024;

test('a primary replication node answers block status with its file\'s, holes included', async (t) => {
  const { node } = await primaryFixture(t, 8 * MiB);
  const file = node.file!;
  await file.write(MiB, Buffer.alloc(64 * 1024, 0x5a));
  for (const [offset, length] of [
    [0, 8 * MiB],
    [MiB, 7 * MiB],
    [MiB + 64 * 1024, 4 * MiB],
  ] as const) {
    assert.deepEqual(await node.blockStatus(offset, length), await file.blockStatus(offset, length));
  }
  // never written: not "allocated data", as a filter answering for itself would say
  const hole = await node.blockStatus(0, MiB);
  assert.equal(hole.data, false);
  assert.equal(hole.zero, true);
  assert.equal(hole.length, MiB);
});
