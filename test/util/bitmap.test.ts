import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Bitmap } from '../../src/util/bitmap.js';
import { RateLimit } from '../../src/util/rate-limit.js';

test('bitmap ranges, counts and runs agree with a plain boolean model', () => {
  const g = 4096;
  const size = 100 * g + 123; // 101 bits, the last one short
  const b = new Bitmap(size, g);
  const model = new Array<boolean>(101).fill(false);
  let x = 12345;
  const rnd = (n: number): number => ((x = (x * 1103515245 + 12345) >>> 0) >>> 8) % n;
  for (let i = 0; i < 500; i++) {
    const off = rnd(size);
    const len = 1 + rnd(10 * g);
    const set = rnd(2) === 0;
    if (set) b.setRange(off, len);
    else b.resetRange(off, len);
    for (let k = Math.floor(off / g); k < Math.min(101, Math.ceil((off + len) / g)); k++) model[k] = set;
    assert.equal(b.count, model.filter(Boolean).length);
  }
  for (let k = 0; k < 101; k++) assert.equal(b.get(k), model[k]);
  const runs = [...b.runs()];
  const fromModel: Array<{ offset: number; length: number }> = [];
  for (let k = 0; k < 101; ) {
    if (!model[k]) {
      k++;
      continue;
    }
    let e = k;
    while (e < 101 && model[e]) e++;
    fromModel.push({ offset: k * g, length: Math.min(size, e * g) - k * g });
    k = e;
  }
  assert.deepEqual(runs, fromModel);
  b.setAll();
  assert.equal(b.count, 101);
  assert.equal(b.dirtyBytes, size);
  assert.equal(b.nextClear(0), 101);
  b.clearAll();
  assert.equal(b.nextSet(0), -1);
});

test('rate limit: unlimited never waits; a limit makes overdrawn work wait in proportion', () => {
  const r = new RateLimit(0);
  r.account(1 << 30, 0);
  assert.equal(r.delayMs(0), 0);
  const l = new RateLimit(1000); // 1000 bytes/s
  const t0 = performance.now();
  l.account(2000, t0);
  const d = l.delayMs(t0);
  assert.ok(d > 1900 && d <= 2000, `delay ${d}`);
  assert.equal(l.delayMs(t0 + 2001), 0);
});
