// The pieces and marks a live resync persists (src/pair/reprotect.ts): a pass cut into jobs of
// at most N bytes in ascending order, and the part of a pass above a flushed mark.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { clipExtents, splitPieces } from '../../src/pair/reprotect.js';

const K = 1024;

test('a pass is cut into ascending pieces of at most the piece size, covering exactly its ranges', () => {
  const extents = [
    { offset: 0, length: 64 * K },
    { offset: 128 * K, length: 200 * K },
    { offset: 1024 * K, length: 8 * K },
  ];
  const pieces = splitPieces(extents, 128 * K);
  assert.deepEqual(pieces, [
    [{ offset: 0, length: 64 * K }, { offset: 128 * K, length: 64 * K }],
    [{ offset: 192 * K, length: 128 * K }],
    [{ offset: 320 * K, length: 8 * K }, { offset: 1024 * K, length: 8 * K }],
  ]);
  for (const p of pieces) assert.ok(p.reduce((a, r) => a + r.length, 0) <= 128 * K);
  assert.deepEqual(splitPieces([], 128 * K), []);
  assert.deepEqual(splitPieces(extents, 1 << 30), [extents]);
});

test('the part of a pass above a mark: ranges below dropped, the one across it cut', () => {
  const extents = [
    { offset: 0, length: 64 * K },
    { offset: 128 * K, length: 200 * K },
    { offset: 1024 * K, length: 8 * K },
  ];
  assert.deepEqual(clipExtents(extents, 0), extents);
  assert.deepEqual(clipExtents(extents, 192 * K), [{ offset: 192 * K, length: 136 * K }, { offset: 1024 * K, length: 8 * K }]);
  assert.deepEqual(clipExtents(extents, 328 * K), [{ offset: 1024 * K, length: 8 * K }]);
  assert.deepEqual(clipExtents(extents, 1032 * K), []);
});
