// The file driver's small writes as a synchronous pwrite on the event loop
// (LOCKSTEP_SYNC_WRITES=on): the same writes through a raw node leave the same file as by
// default (io_uring or the thread pool) and as without the native helper at all, FUA writes among
// them; and the gate that sends a node back to the asynchronous path when synchronous
// writes become slow (throttling) follows its rules.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from '../../helpers/graph.js';
import { SyncWriteGate } from '../../../src/block/drivers/file.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GRAPH = new URL('../../../src/block/graph.js', import.meta.url).href;
const REGISTRY = new URL('../../../src/block/registry.js', import.meta.url).href;

/** Writes, in a child with `env`, the pieces of `dataFile` at their offsets into `file`. */
function writeInChild(file: string, dataFile: string, writes: Array<[number, number, boolean]>, env: Record<string, string>): void {
  const script = `
    import { BlockGraph } from ${JSON.stringify(GRAPH)};
    import { createRegistry } from ${JSON.stringify(REGISTRY)};
    import { readFileSync } from 'node:fs';
    const g = new BlockGraph(createRegistry());
    const n = await g.open({ driver: 'raw', 'node-name': 'd', file: { driver: 'file', filename: ${JSON.stringify(file)} } });
    const all = readFileSync(${JSON.stringify(dataFile)});
    let at = 0;
    const w = ${JSON.stringify(writes)}.map(([off, len, fua]) => [off, all.subarray(at, (at += len)), fua]);
    // first the writes that overlap nothing, all in flight at once, then the overlapping ones in order
    await Promise.all(w.slice(0, -3).map(([off, d, fua]) => n.write(off, d, { fua })));
    for (const [off, d, fua] of w.slice(-3)) await n.write(off, d, { fua });
    await n.flush();
    await g.closeAll();`;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8', env: { ...process.env, ...env } });
  assert.equal(r.error, undefined);
  assert.equal(r.status, 0, r.stderr);
}

test('synchronous small writes leave the same bytes as the asynchronous path and as the native-free fallback', (t) => {
  const dir = tempDir(t);
  const content = randomBytes(4 * MiB);
  // [offset, length, fua]: 4 KiB writes as fio makes them, odd sizes and offsets, the 64 KiB
  // limit and one byte past it, FUA ones (never synchronous), one up to the end of the disk, and
  // three overlapping at the end (written one after another)
  const writes: Array<[number, number, boolean]> = [
    ...Array.from({ length: 64 }, (_, i): [number, number, boolean] => [((i * 37) % 256) * 4 * KiB + 2 * MiB, 4 * KiB, false]),
    [7, 513, false],
    [100_000, 64 * KiB, false],
    [300_000, 64 * KiB + 1, false],
    [600_000, 8 * KiB, true],
    [700_001, 3000, true],
    [4 * MiB - 100_000, 100_000, false],
    [1 * MiB, 32 * KiB, false],
    [1 * MiB + 4 * KiB, 4 * KiB, false],
    [1 * MiB + 2 * KiB, 128 * KiB, false],
  ];
  // the first 64 must not overlap each other (they are in flight together)
  assert.equal(new Set(writes.slice(0, 64).map(([o]) => o)).size, 64);
  const data = writes.map(([, len]) => randomBytes(len));
  const dataFile = join(dir, 'writes.bin');
  writeFileSync(dataFile, Buffer.concat(data));
  let model = Buffer.from(content);
  for (const [i, [off, len]] of writes.entries()) {
    if (off + len > model.length) model = Buffer.concat([model, Buffer.alloc(off + len - model.length)]);
    data[i]!.copy(model, off);
  }
  const modes: Record<string, Record<string, string>> = {
    'synchronous (LOCKSTEP_SYNC_WRITES=on)': { LOCKSTEP_SYNC_WRITES: 'on' },
    'asynchronous (the default)': {},
    'synchronous without the native helper': { LOCKSTEP_SYNC_WRITES: 'on', LOCKSTEP_NATIVE: 'off' },
    'asynchronous without the native helper': { LOCKSTEP_SYNC_WRITES: 'off', LOCKSTEP_NATIVE: 'off' },
  };
  for (const [name, env] of Object.entries(modes)) {
    const f = join(dir, `${name.replace(/\W+/g, '-')}.raw`);
    writeFileSync(f, content);
    writeInChild(f, dataFile, writes, env);
    assert.equal(Buffer.compare(readFileSync(f), model), 0, name);
  }
});

test('a lone slow synchronous write keeps them synchronous: it is usually preemption', () => {
  const g = new SyncWriteGate(10, 1000, 1000, 60_000);
  assert.equal(g.allowed(0), true);
  g.record(0, 12);
  assert.equal(g.allowed(12), true);
  // the next slow one more than a window later is lone again
  g.record(1500, 1520);
  assert.equal(g.allowed(1520), true);
  // fast writes never count
  for (let t = 2000; t < 3000; t += 1) g.record(t, t + 9);
  assert.equal(g.allowed(3000), true);
});

test('two slow writes within the window send writes back to the asynchronous path, longer each time', () => {
  const g = new SyncWriteGate(10, 1000, 1000, 8000);
  g.record(0, 50);
  g.record(100, 300); // throttled again: back off for 1 s
  assert.equal(g.allowed(300), false);
  assert.equal(g.allowed(1299), false);
  assert.equal(g.allowed(1300), true);
  // throttled again right after: 2 s, then 4 s, then capped at 8 s
  g.record(1300, 1320);
  g.record(1330, 1350);
  assert.equal(g.allowed(3349), false);
  assert.equal(g.allowed(3350), true);
  g.record(3350, 3370);
  g.record(3380, 3400);
  assert.equal(g.allowed(7399), false);
  assert.equal(g.allowed(7400), true);
  g.record(7400, 7420);
  g.record(7430, 7450);
  assert.equal(g.allowed(15_449), false);
  assert.equal(g.allowed(15_450), true);
  g.record(15_450, 15_470);
  g.record(15_480, 15_500);
  assert.equal(g.allowed(23_499), false, 'capped at maxBackoffMs');
  assert.equal(g.allowed(23_500), true);
});

test('after a quiet spell the back-off starts short again', () => {
  const g = new SyncWriteGate(10, 1000, 1000, 8000);
  g.record(0, 20);
  g.record(30, 50);
  g.record(1050, 1070);
  g.record(1080, 1100); // second back-off: 2 s, until 3100
  assert.equal(g.allowed(3099), false);
  // more than maxBackoffMs after the last back-off ended: 1 s again
  g.record(20_000, 20_020);
  g.record(20_030, 20_050);
  assert.equal(g.allowed(21_049), false);
  assert.equal(g.allowed(21_050), true);
});
