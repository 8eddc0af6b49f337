// x-meta-read / x-meta-write against `./bin/lockstep daemon`: the JSON object round-trips,
// a missing file reads as null, a leftover temporary file of a killed writer is ignored, and
// bad input gets a clear error without touching what is stored.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from '../helpers/graph.js';
import { rejectsWithDesc, startDaemon } from '../helpers/daemon.js';

const rejects = rejectsWithDesc;

test('x-meta-read and x-meta-write', async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, dir, []);
  const c = await d.client();
  const path = join(dir, 'disk.meta');

  await t.test('a file that does not exist reads as null', async () => {
    assert.equal(await c.execute('x-meta-read', { filename: path }), null);
  });

  await t.test('an object round-trips and replaces the previous one', async () => {
    const first = { current: 'a1', history: ['a0'], consistent: true, nested: { n: 1.5, s: 'ü' } };
    assert.deepEqual(await c.execute('x-meta-write', { filename: path, data: first }), {});
    assert.deepEqual(await c.execute('x-meta-read', { filename: path }), first);
    assert.deepEqual(JSON.parse(readFileSync(path, 'utf8')), first);
    const second = { current: 'b7', consistent: false };
    await c.execute('x-meta-write', { filename: path, data: second });
    assert.deepEqual(await c.execute('x-meta-read', { filename: path }), second);
    // nothing left beside it: the temporary file was renamed over the destination
    assert.deepEqual(readdirSync(dir).filter((f) => f.includes('disk.meta')), ['disk.meta']);
  });

  await t.test("a killed writer's temporary file does not change what is read", async () => {
    writeFileSync(join(dir, '.disk.meta.999.deadbeef.tmp'), '{"current": "half');
    assert.deepEqual(await c.execute('x-meta-read', { filename: path }), { current: 'b7', consistent: false });
  });

  await t.test('an object of 900 KiB is stored whole', async () => {
    const big = { blob: 'x'.repeat(900 * 1024) };
    await c.execute('x-meta-write', { filename: join(dir, 'big.meta'), data: big });
    assert.deepEqual(await c.execute('x-meta-read', { filename: join(dir, 'big.meta') }), big);
  });

  await t.test('bad input is refused and the stored object stays', async () => {
    await rejects(c.execute('x-meta-write', { filename: path, data: [1, 2] }), /Invalid parameter type for 'data', expected: object/);
    await rejects(c.execute('x-meta-write', { filename: join(dir, 'no-such-dir', 'm'), data: {} }), /Cannot write metadata '.*no-such-dir\/m': .*ENOENT/);
    assert.deepEqual(await c.execute('x-meta-read', { filename: path }), { current: 'b7', consistent: false });
    writeFileSync(join(dir, 'broken.meta'), '{"a": ');
    await rejects(c.execute('x-meta-read', { filename: join(dir, 'broken.meta') }), /Metadata '.*broken\.meta' is not valid JSON/);
    writeFileSync(join(dir, 'list.meta'), '[1]');
    await rejects(c.execute('x-meta-read', { filename: join(dir, 'list.meta') }), /does not hold a JSON object/);
    await rejects(c.execute('x-meta-read', { filename: dir }), /Cannot read metadata/);
  });
});
