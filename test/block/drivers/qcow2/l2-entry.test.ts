// L1/L2 entry encoding: host offsets anywhere in a large image file round-trip, in particular
// those with bit 31 set (a file past 2 GiB), which a signed 32-bit AND turned negative.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ClusterKind, decodeL1, encodeL1, readL2, writeL2Normal } from '../../../../src/block/drivers/qcow2/l2-entry.js';

const OFFSETS = [0x10000, 0x7fff0000, 0x80000000, 0xfffe0000, 0x100000000, 0x180010000, 0x7f_ffff_0000];

test('a normal L2 entry reads back the host offset it was written with, past 2 and 4 GiB too', () => {
  const table = Buffer.alloc(8 * OFFSETS.length);
  OFFSETS.forEach((o, i) => writeL2Normal(table, i, o));
  OFFSETS.forEach((o, i) => {
    const e = readL2(table, i, true);
    assert.equal(e.kind, ClusterKind.Normal);
    assert.equal(e.offset, o, `entry ${i}`);
    assert.equal(e.copied, true);
  });
});

test('an L1 entry decodes the L2 table offset it was encoded with, past 2 and 4 GiB too', () => {
  const buf = Buffer.alloc(8 * OFFSETS.length);
  OFFSETS.forEach((o, i) => encodeL1(buf, i, o, true));
  OFFSETS.forEach((o, i) => {
    const d = decodeL1(buf.readUInt32BE(i * 8), buf.readUInt32BE(i * 8 + 4));
    assert.equal(d.offset, o, `entry ${i}`);
    assert.equal(d.copied, true);
  });
});
