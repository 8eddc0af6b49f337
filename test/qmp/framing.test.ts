import { test } from 'node:test';
import assert from 'node:assert/strict';
import { JsonSplitter, parseJson, type FrameResult } from '../../src/qmp/framing.js';

function collect(maxSize?: number, maxDepth?: number): { frames: FrameResult[]; splitter: JsonSplitter } {
  const frames: FrameResult[] = [];
  return { frames, splitter: new JsonSplitter((r) => frames.push(r), maxSize, maxDepth) };
}

const STREAM =
  '{"execute": "qmp_capabilities"}\r\n' +
  '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"a{b}\\"c","size":1}}' +
  '  [1, [2, {"x": "]"}]]\n' +
  '{"id": "é✓", "execute": "x"}';

const EXPECTED: unknown[] = [
  { execute: 'qmp_capabilities' },
  { execute: 'blockdev-add', arguments: { driver: 'null-co', 'node-name': 'a{b}"c', size: 1 } },
  [1, [2, { x: ']' }]],
  { id: 'é✓', execute: 'x' },
];

test('values back to back come out whole whatever the split offset (UTF-8 split inside characters too)', () => {
  const bytes = Buffer.from(STREAM, 'utf8');
  for (let cut = 0; cut <= bytes.length; cut++) {
    const { frames, splitter } = collect();
    splitter.feed(bytes.subarray(0, cut));
    splitter.feed(bytes.subarray(cut));
    assert.deepEqual(
      frames.map((f) => (f.ok ? f.value : f.error)),
      EXPECTED,
      `split at ${cut}`,
    );
  }
});

test('one byte at a time', () => {
  const { frames, splitter } = collect();
  for (const b of Buffer.from(STREAM, 'utf8')) splitter.feed(Buffer.from([b]));
  assert.deepEqual(
    frames.map((f) => (f.ok ? f.value : f.error)),
    EXPECTED,
  );
});

test('malformed values give QEMU-style parse errors and the next value still parses', () => {
  const { frames, splitter } = collect();
  splitter.feed('{"execute": foo}\n@\n}{"execute":"ok"}\n123 "str"\n{"a":1,}\n');
  assert.deepEqual(frames, [
    { ok: false, error: "JSON parse error, invalid keyword 'foo'" },
    { ok: false, error: 'JSON parse error, stray \'@\'' },
    { ok: false, error: 'JSON parse error, expecting value' },
    { ok: true, value: { execute: 'ok' } },
    { ok: true, value: 123 },
    { ok: true, value: 'str' },
    frames[6]!,
  ]);
  assert.equal(frames[6]!.ok, false);
  assert.match((frames[6] as { error: string }).error, /^JSON parse error, /);
});

test('an oversized value is skipped to its end and reported once, then framing goes on', () => {
  const { frames, splitter } = collect(1000);
  const big = JSON.stringify({ execute: 'x', arguments: { data: 'y'.repeat(5000), nested: ['}', '{'] } });
  for (let i = 0; i < big.length; i += 333) splitter.feed(big.slice(i, i + 333));
  splitter.feed('{"execute":"after"}');
  assert.deepEqual(frames, [
    { ok: false, error: 'JSON parse error, message larger than 1000 bytes' },
    { ok: true, value: { execute: 'after' } },
  ]);
});

test('nesting deeper than the limit is refused, then framing goes on', () => {
  const { frames, splitter } = collect(undefined, 64);
  splitter.feed('['.repeat(100) + ']'.repeat(100) + '{"execute":"after"}');
  assert.deepEqual(frames, [
    { ok: false, error: 'JSON parse error, nesting depth limit exceeded' },
    { ok: true, value: { execute: 'after' } },
  ]);
});

test('parseJson keeps the description short and never echoes the input', () => {
  const r = parseJson('{"a": [1, 2' + ' '.repeat(10) + '}');
  assert.equal(r.ok, false);
  assert.ok(!(r as { error: string }).error.includes('"a"'));
});
