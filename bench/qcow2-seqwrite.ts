// Sequential 64 KiB writes into a new 1 GiB qcow2 image through the block graph, side by
// side with `qemu-img bench -w` doing the same (queue depth 1, writeback cache); then 4 KiB
// writes at queue depth 16 into a new 256 MiB image (partial clusters: copy-on-write and
// concurrent allocation), also side by side; then the time make_empty takes on an overlay
// holding 1 GiB of data.
// Run: npx tsc -p . && node dist/bench/qcow2-seqwrite.js [dir]
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BlockGraph } from '../src/block/graph.js';
import { createRegistry } from '../src/block/registry.js';
import { createQcow2 } from '../src/block/drivers/qcow2/create.js';

const GiB = 2 ** 30;
const CHUNK = 64 * 1024;

async function lockstepSeqWrite(path: string): Promise<number> {
  await createQcow2(path, { size: GiB });
  const g = new BlockGraph(createRegistry());
  const n = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: path } });
  const buf = Buffer.alloc(CHUNK, 0xab);
  const t0 = process.hrtime.bigint();
  for (let off = 0; off < GiB; off += CHUNK) await n.write(off, buf);
  await n.flush();
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  await g.closeAll();
  return GiB / 2 ** 20 / secs;
}

function qemuSeqWrite(path: string, size: number, chunk: number, depth: number): number | null {
  const c = spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', path, String(size)]);
  if (c.status !== 0) return null;
  const t0 = process.hrtime.bigint();
  const count = String(size / chunk);
  const r = spawnSync('qemu-img', ['bench', '-w', '-f', 'qcow2', '-t', 'writeback', '-d', String(depth), '-s', String(chunk), '-c', count, '--flush-interval', count, path], { encoding: 'utf8' });
  if (r.status !== 0) {
    console.error(r.stderr);
    return null;
  }
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  return size / 2 ** 20 / secs;
}

async function lockstepDepthWrite(path: string, size: number, chunk: number, depth: number): Promise<number> {
  await createQcow2(path, { size });
  const g = new BlockGraph(createRegistry());
  const n = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: path } });
  const buf = Buffer.alloc(chunk, 0xcd);
  let next = 0;
  const t0 = process.hrtime.bigint();
  await Promise.all(
    Array.from({ length: depth }, async () => {
      for (;;) {
        const off = next;
        if (off >= size) return;
        next += chunk;
        await n.write(off, buf);
      }
    }),
  );
  await n.flush();
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  await g.closeAll();
  return size / 2 ** 20 / secs;
}

async function makeEmptyTime(path: string, base: string): Promise<number> {
  spawnSync('qemu-img', ['create', '-q', '-f', 'raw', base, '1G']);
  await createQcow2(path, { size: GiB, backingFile: base, backingFormat: 'raw' });
  const g = new BlockGraph(createRegistry());
  const n = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: path } });
  const buf = Buffer.alloc(1 << 20, 0x11);
  for (let off = 0; off < GiB; off += buf.length) await n.write(off, buf);
  await n.flush();
  const t0 = process.hrtime.bigint();
  await n.makeEmpty();
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  await g.closeAll();
  return ms;
}

const dir = mkdtempSync(join(process.argv[2] ?? tmpdir(), 'qcow2-bench-'));
try {
  const ours = await lockstepSeqWrite(join(dir, 'ours.qcow2'));
  const theirs = qemuSeqWrite(join(dir, 'qemu.qcow2'), GiB, CHUNK, 1);
  console.log(`sequential 64 KiB writes into a new 1 GiB qcow2: lockstep ${ours.toFixed(0)} MiB/s` + (theirs ? `, qemu-img bench ${theirs.toFixed(0)} MiB/s, ratio ${(ours / theirs).toFixed(2)}` : ' (qemu-img bench unavailable)'));
  rmSync(join(dir, 'ours.qcow2'));
  rmSync(join(dir, 'qemu.qcow2'), { force: true });
  const small = 256 * 2 ** 20;
  const oursQd = await lockstepDepthWrite(join(dir, 'qd-ours.qcow2'), small, 4096, 16);
  const theirsQd = qemuSeqWrite(join(dir, 'qd-qemu.qcow2'), small, 4096, 16);
  console.log(`4 KiB writes at queue depth 16 into a new 256 MiB qcow2: lockstep ${oursQd.toFixed(0)} MiB/s` + (theirsQd ? `, qemu-img bench ${theirsQd.toFixed(0)} MiB/s, ratio ${(oursQd / theirsQd).toFixed(2)}` : ''));
  rmSync(join(dir, 'qd-ours.qcow2'));
  rmSync(join(dir, 'qd-qemu.qcow2'), { force: true });
  const ms = await makeEmptyTime(join(dir, 'overlay.qcow2'), join(dir, 'base.raw'));
  console.log(`make_empty of an overlay holding 1 GiB: ${ms.toFixed(2)} ms`);
} finally {
  rmSync(dir, { recursive: true, force: true });
}
