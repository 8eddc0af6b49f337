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

test('bitmap serialisation is least significant bit first per byte; assign, intersect and union keep the count', () => {
  const b = new Bitmap(70 * 512, 512); // 70 bits: 9 bytes, the last one holds 6 bits
  for (const i of [0, 3, 8, 31, 32, 69]) b.setBits(i, i + 1, true);
  const bytes = b.toBytes();
  assert.deepEqual([...bytes], [0b1001, 0b1, 0, 0b10000000, 0b1, 0, 0, 0, 0b100000]);
  assert.deepEqual([...b.toBytes(3, 5)], [0b10000000, 0b1]);
  assert.equal(b.byteLength, 9);
  const c = new Bitmap(70 * 512, 512);
  c.loadBytes(Buffer.from([...bytes.subarray(0, 8), 0xff])); // bits past the end are ignored
  assert.equal(c.count, 6 + 5);
  assert.deepEqual([...c.runs()].map((r) => r.offset / 512), [0, 3, 8, 31, 64]);
  c.intersect(b);
  assert.equal(c.count, 6);
  assert.deepEqual([...c.toBytes()], [...bytes]);
  const d = new Bitmap(70 * 512, 512);
  d.setBits(1, 3, true);
  d.union(b);
  assert.equal(d.count, 8);
  d.assign(b);
  assert.equal(d.count, 6);
  assert.deepEqual([...d.toBytes()], [...bytes]);
});
