// The ranges and marks of a live resync (src/pair/reprotect.ts, src/pair/sync.ts): a pass's
// ranges with their small gaps filled, and the part of a pass above a flushed mark.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { clipExtents } from '../../src/pair/reprotect.js';
import { coalesceExtents } from '../../src/pair/sync.js';
import { InvalidArgumentError } from '../../src/errors.js';

const K = 1024;

test('a pass\'s ranges: gaps of at most the merge gap filled, larger ones kept, ranges never shrunk', () => {
  const extents = [
    { offset: 0, length: 64 * K },
    { offset: 128 * K, length: 64 * K }, // gap 64 KiB
    { offset: 320 * K, length: 64 * K }, // gap 128 KiB
    { offset: 513 * K, length: 8 * K }, // gap 129 KiB
    { offset: 521 * K, length: 7 * K }, // touching
  ];
  assert.deepEqual(coalesceExtents(extents, 128 * K), [
    { offset: 0, length: 384 * K },
    { offset: 513 * K, length: 15 * K },
  ]);
  assert.deepEqual(coalesceExtents(extents, 64 * K), [
    { offset: 0, length: 192 * K },
    { offset: 320 * K, length: 64 * K },
    { offset: 513 * K, length: 15 * K },
  ]);
  // gap 0 joins only touching ranges
  assert.deepEqual(coalesceExtents(extents, 0), [...extents.slice(0, 3), { offset: 513 * K, length: 15 * K }]);
  assert.deepEqual(coalesceExtents([], 128 * K), []);
  // the input is left as it was
  assert.deepEqual(extents[0], { offset: 0, length: 64 * K });
  // ranges out of order or overlapping are a caller's bug, not something to guess about
  assert.throws(() => coalesceExtents([{ offset: 64 * K, length: K }, { offset: 0, length: K }], 0), InvalidArgumentError);
  assert.throws(() => coalesceExtents([{ offset: 0, length: 2 * K }, { offset: K, length: K }], 0), InvalidArgumentError);
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
