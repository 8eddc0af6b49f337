// Sequential 64 KiB writes into a new 1 GiB qcow2 image through the block graph, side by
// side with `qemu-img bench -w` doing the same (queue depth 1, writeback cache), then the
// time make_empty takes on an overlay holding that 1 GiB of data.
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

function qemuSeqWrite(path: string): number | null {
  const c = spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', path, '1G']);
  if (c.status !== 0) return null;
  const t0 = process.hrtime.bigint();
  const r = spawnSync('qemu-img', ['bench', '-w', '-f', 'qcow2', '-t', 'writeback', '-d', '1', '-s', String(CHUNK), '-c', String(GiB / CHUNK), '--flush-interval', String(GiB / CHUNK), path], { encoding: 'utf8' });
  if (r.status !== 0) {
    console.error(r.stderr);
    return null;
  }
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  return GiB / 2 ** 20 / secs;
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
  const theirs = qemuSeqWrite(join(dir, 'qemu.qcow2'));
  console.log(`sequential 64 KiB writes into a new 1 GiB qcow2: lockstep ${ours.toFixed(0)} MiB/s` + (theirs ? `, qemu-img bench ${theirs.toFixed(0)} MiB/s, ratio ${(ours / theirs).toFixed(2)}` : ' (qemu-img bench unavailable)'));
  rmSync(join(dir, 'ours.qcow2'));
  rmSync(join(dir, 'qemu.qcow2'), { force: true });
  const ms = await makeEmptyTime(join(dir, 'overlay.qcow2'), join(dir, 'base.raw'));
  console.log(`make_empty of an overlay holding 1 GiB: ${ms.toFixed(2)} ms`);
} finally {
  rmSync(dir, { recursive: true, force: true });
}
