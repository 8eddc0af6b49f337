// The file driver's reads and writes through io_uring (the native helper, LOCKSTEP_IO_URING=on
// in this process) against Node's fs (LOCKSTEP_IO_URING=off, in a child process): the same
// file read both ways gives the same bytes, writes either way leave the same file, and reads
// past EOF are zeroes in both. The default (auto) mixes both paths by request size.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { openSync, closeSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { newGraph, tempDir } from '../../helpers/graph.js';
import { loadNative, nativeUnavailableReason } from '../../../src/util/native.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GRAPH = new URL('../../../src/block/graph.js', import.meta.url).href;
const REGISTRY = new URL('../../../src/block/registry.js', import.meta.url).href;

// read when the helper is first loaded, which happens in the test below
process.env.LOCKSTEP_IO_URING = 'on';
// small writes through the ring here, not the synchronous pwrite (file-sync-write.test.ts)
process.env.LOCKSTEP_SYNC_WRITES = 'off';

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

/** Runs `body` in a child process with the io_uring path off; `g` is an open graph there. */
function withoutRing(body: string): string {
  return inChild(body, 'off');
}

/** Runs `body` in a child with LOCKSTEP_IO_URING=`mode` (undefined: unset). */
function inChild(body: string, mode: string | undefined): string {
  const script = `
    import { BlockGraph } from ${JSON.stringify(GRAPH)};
    import { createRegistry } from ${JSON.stringify(REGISTRY)};
    import { createHash } from 'node:crypto';
    const sha = (b) => createHash('sha256').update(b).digest('hex');
    const g = new BlockGraph(createRegistry());
    ${body}
    await g.closeAll();`;
  const env = { ...process.env, LOCKSTEP_IO_URING: mode };
  if (mode === undefined) delete env.LOCKSTEP_IO_URING;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8', env });
  assert.equal(r.error, undefined);
  assert.equal(r.status, 0, r.stderr);
  return r.stdout.trim();
}

/** The writes both sides make: offsets chosen to cross page, cluster and EOF boundaries. */
const WRITES: Array<[number, number]> = [
  [0, 4096],
  [5000, 70_000],
  [MiB - 3, 9],
  [3 * MiB + 1000, 128 * KiB], // grows the file
];

test('io_uring and Node fs give the same bytes for reads, writes and reads past EOF', async (t) => {
  const native = loadNative();
  if (!native?.ring) {
    const reason = native ? 'the helper was built without io_uring' : `native helper unavailable: ${nativeUnavailableReason()}`;
    if (process.env.CI) assert.fail(reason);
    t.skip(reason);
    return;
  }
  const dir = tempDir(t);
  const content = randomBytes(3 * MiB + 1234);
  const a = join(dir, 'a.raw');
  const b = join(dir, 'b.raw');
  writeFileSync(a, content);
  writeFileSync(b, content);
  // whether this kernel takes io_uring requests (containers may forbid it: then both sides
  // use Node's fs, and the comparison below still checks the bytes)
  const fd = openSync(a, 'r');
  const probe = native.ring.read(fd, Buffer.alloc(16), 0);
  t.diagnostic(probe ? 'io_uring in use' : 'io_uring refused by the kernel: the fs path is used');
  if (probe) assert.equal(await probe, 16);
  closeSync(fd);

  // reads: whole file and past its end, here (io_uring) and in the child (fs)
  const g = newGraph();
  t.after(() => g.closeAll());
  const node = await g.open({ driver: 'file', filename: a });
  const span = content.length + 5000;
  const expected = Buffer.concat([content, Buffer.alloc(5000)]);
  const here = Buffer.alloc(span, 0xa5);
  await node.readInto(0, here);
  assert.equal(Buffer.compare(here, expected), 0, 'io_uring read');
  const there = withoutRing(`
    const n = await g.open({ driver: 'file', filename: ${JSON.stringify(a)}, 'read-only': true, locking: 'off' });
    const buf = Buffer.alloc(${span}, 0xa5);
    await n.readInto(0, buf);
    process.stdout.write(sha(buf) + ' ' + sha(await n.read(0, ${span})));`);
  assert.equal(there, `${sha(expected)} ${sha(expected)}`, 'fs read');
  // many requests in flight at once, as a queue-depth workload has them
  const pieces = await Promise.all(Array.from({ length: 48 }, (_, i) => node.read(i * 64 * KiB, 64 * KiB)));
  assert.equal(Buffer.compare(Buffer.concat(pieces), content.subarray(0, 48 * 64 * KiB)), 0, 'concurrent io_uring reads');

  // writes: the same data at the same offsets, here into a, in the child into b
  const data = WRITES.map(([, len]) => randomBytes(len));
  await Promise.all(WRITES.map(([off], i) => node.write(off, data[i]!)));
  await node.flush();
  // the data goes to the child in a file (a command line holds at most 128 KiB)
  const dataFile = join(dir, 'writes.bin');
  writeFileSync(dataFile, Buffer.concat(data));
  withoutRing(`
    const { readFileSync } = await import('node:fs');
    const all = readFileSync(${JSON.stringify(dataFile)});
    const n = await g.open({ driver: 'file', filename: ${JSON.stringify(b)} });
    let at = 0;
    const w = ${JSON.stringify(WRITES)}.map(([off, len]) => [off, all.subarray(at, (at += len))]);
    await Promise.all(w.map(([off, d]) => n.write(off, d)));
    await n.flush();`);
  let model = Buffer.from(content);
  for (const [i, [off, len]] of WRITES.entries()) {
    if (off + len > model.length) model = Buffer.concat([model, Buffer.alloc(off + len - model.length)]);
    data[i]!.copy(model, off);
  }
  assert.equal(Buffer.compare(readFileSync(a), model), 0, 'file written through io_uring');
  assert.equal(Buffer.compare(readFileSync(b), model), 0, 'file written through fs');
});

test('by default the ring takes requests up to 64 KiB and leaves larger ones to fs, with the same bytes', async (t) => {
  const native = loadNative();
  if (!native?.ring) {
    const reason = native ? 'the helper was built without io_uring' : `native helper unavailable: ${nativeUnavailableReason()}`;
    if (process.env.CI) assert.fail(reason);
    t.skip(reason);
    return;
  }
  const dir = tempDir(t);
  const content = randomBytes(2 * MiB);
  const f = join(dir, 'c.raw');
  writeFileSync(f, content);
  const writes: Array<[number, Buffer]> = [
    [4096, randomBytes(4096)],
    [100_000, randomBytes(64 * KiB)],
    [MiB, randomBytes(64 * KiB + 1)],
    [MiB + 300 * KiB, randomBytes(512 * KiB)],
  ];
  const dataFile = join(dir, 'writes.bin');
  writeFileSync(dataFile, Buffer.concat(writes.map(([, d]) => d)));
  const NATIVE = new URL('../../../src/util/native.js', import.meta.url).href;
  const out = inChild(
    `
    const { readFileSync, openSync, closeSync } = await import('node:fs');
    const { loadNative, RING_AUTO_MAX } = await import(${JSON.stringify(NATIVE)});
    const ring = loadNative().ring;
    const fd = openSync(${JSON.stringify(f)}, 'r+');
    // which sizes the ring takes (null: the caller uses fs); the probes write back what is there
    const taken = [];
    for (const n of [4096, RING_AUTO_MAX, RING_AUTO_MAX + 1, 1 << 20]) {
      const r = ring.read(fd, Buffer.alloc(n), 0);
      if (r) await r;
      const w = ring.write(fd, readFileSync(${JSON.stringify(f)}).subarray(0, n), 0);
      if (w) await w;
      taken.push(n + ':' + (r !== null) + ',' + (w !== null));
    }
    closeSync(fd);
    const all = readFileSync(${JSON.stringify(dataFile)});
    const n = await g.open({ driver: 'file', filename: ${JSON.stringify(f)} });
    let at = 0;
    const w = ${JSON.stringify(writes.map(([o, d]) => [o, d.length]))}.map(([off, len]) => [off, all.subarray(at, (at += len))]);
    await Promise.all(w.map(([off, d]) => n.write(off, d)));
    await n.flush();
    const sizes = [4096, 64 * 1024, 64 * 1024 + 1, 600 * 1024];
    const reads = await Promise.all(sizes.map((len, i) => n.read(i * 333_333, len)));
    process.stdout.write(taken.join(' ') + '\\n' + reads.map(sha).join(' '));`,
    undefined,
  );
  const [taken, shas] = out.split('\n');
  // the probe above says whether this kernel takes io_uring at all
  const fd = openSync(f, 'r');
  const probe = native.ring.read(fd, Buffer.alloc(16), 0);
  if (probe) await probe;
  closeSync(fd);
  if (probe) assert.equal(taken, '4096:true,true 65536:true,true 65537:false,false 1048576:false,false');
  else t.diagnostic('io_uring refused by the kernel: the fs path is used');
  const model = Buffer.from(content);
  for (const [off, d] of writes) d.copy(model, off);
  assert.equal(Buffer.compare(readFileSync(f), model), 0, 'file written in auto mode');
  const sizes = [4096, 64 * KiB, 64 * KiB + 1, 600 * KiB];
  assert.equal(shas, sizes.map((len, i) => sha(model.subarray(i * 333_333, i * 333_333 + len))).join(' '), 'reads in auto mode');
});

test('LOCKSTEP_IO_URING other than on, off or auto is refused with a clear error', () => {
  const NATIVE = new URL('../../../src/util/native.js', import.meta.url).href;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', `const { loadNative } = await import(${JSON.stringify(NATIVE)}); loadNative();`], {
    encoding: 'utf8',
    env: { ...process.env, LOCKSTEP_IO_URING: 'yes' },
  });
  assert.notEqual(r.status, 0);
  assert.match(r.stderr, /LOCKSTEP_IO_URING must be on, off or auto, not 'yes'/);
});
