// Block job benchmarks, each side by side with its QEMU equivalent in the same run:
//   1. active commit of a 256 MiB overlay into its base vs `qemu-img commit` (same images)
//   2. mirror of 1 GiB (half zeroes) into an NBD export vs `qemu-img convert` to qemu-nbd
//      (needs lockstep's NBD client driver; reported as skipped until it is merged)
//   3. mirror of the same 1 GiB raw file into an existing raw file vs
//      `qemu-img convert -n` (a local stand-in for row 2)
// Run: npx tsc -p . && node dist/bench/jobs.js [--size-commit MiB] [--size-mirror MiB]
// Prints one line per row with both times and the ratio (lockstep / QEMU; < 1 is faster).

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { copyFileSync, existsSync, mkdtempSync, openSync, closeSync, writeSync, ftruncateSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BlockGraph } from '../src/block/graph.js';
import { createRegistry } from '../src/block/registry.js';
import { JobManager } from '../src/jobs/job.js';
import { startCommit } from '../src/jobs/commit.js';
import { startMirror } from '../src/jobs/mirror.js';

const MiB = 1024 * 1024;

function arg(name: string, dflt: number): number {
  const i = process.argv.indexOf(name);
  return i > 0 ? Number(process.argv[i + 1]) : dflt;
}

function run(cmd: string, args: string[]): void {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr || r.error?.message}`);
}

function timed(cmd: string, args: string[]): number {
  const t0 = performance.now();
  run(cmd, args);
  return performance.now() - t0;
}

function row(name: string, oursMs: number, qemuMs: number): void {
  const ratio = oursMs / qemuMs;
  console.log(`${name.padEnd(58)} lockstep ${oursMs.toFixed(0).padStart(6)} ms   qemu ${qemuMs.toFixed(0).padStart(6)} ms   ratio ${ratio.toFixed(2)}`);
}

async function commitRow(dir: string, sizeMiB: number): Promise<void> {
  const graph = new BlockGraph(createRegistry());
  if (!graph.drivers.has('qcow2')) {
    console.log('active commit: skipped (the qcow2 driver is not in the registry)');
    return;
  }
  const size = sizeMiB * MiB;
  const base = join(dir, 'cbase.qcow2');
  const top = join(dir, 'ctop.qcow2');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', base, String(size)]);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
  run('qemu-io', ['-c', `write -P 0x5a 0 ${size}`, top]);
  // the QEMU side gets identical copies
  const qbase = join(dir, 'qbase.qcow2');
  const qtop = join(dir, 'qtop.qcow2');
  copyFileSync(base, qbase);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', qbase, '-F', 'qcow2', qtop]);
  run('qemu-io', ['-c', `write -P 0x5a 0 ${size}`, qtop]);

  const mgr = new JobManager(graph);
  const t0 = performance.now();
  const baseNode = await graph.open({ driver: 'qcow2', 'node-name': 'base', file: { driver: 'file', filename: base } }, { monitorOwned: true });
  const topNode = await graph.open({ driver: 'qcow2', 'node-name': 'top', file: { driver: 'file', filename: top }, backing: 'base' });
  const be = graph.createBackend(topNode, { name: 'vda' });
  const job = await startCommit(mgr, { top: topNode, base: baseNode, active: true, autoComplete: true });
  const r = await job.done;
  if (r.ret !== 0) throw r.ret;
  await be.flush();
  await graph.closeAll();
  const ours = performance.now() - t0;
  const qemu = timed('qemu-img', ['commit', '-q', qtop]);
  run('qemu-img', ['compare', '-q', base, qbase]);
  row(`active commit ${sizeMiB} MiB (qcow2 -> qcow2)`, ours, qemu);
}

/** A sparse raw file whose even MiBs hold data and odd MiBs are holes. */
function halfZeroRaw(path: string, size: number): void {
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, size);
    const chunk = Buffer.alloc(MiB);
    for (let off = 0; off < size; off += 2 * MiB) {
      for (let i = 0; i < MiB; i += 4096) chunk.writeUInt32LE((off + i) >>> 0, i);
      chunk.fill(0xa5, 4, 4096);
      writeSync(fd, chunk, 0, MiB, off);
    }
  } finally {
    closeSync(fd);
  }
}

async function mirrorRows(dir: string, sizeMiB: number): Promise<void> {
  const size = sizeMiB * MiB;
  const src = join(dir, 'msrc.raw');
  halfZeroRaw(src, size);
  const graph = new BlockGraph(createRegistry());
  if (!graph.drivers.has('nbd')) {
    console.log(`mirror ${sizeMiB} MiB into an NBD export: skipped (the nbd client driver is not in the registry)`);
  } else {
    await nbdRow(dir, src, sizeMiB);
  }
  // local stand-in: raw file -> existing raw file
  const dst = join(dir, 'mdst.raw');
  const qdst = join(dir, 'qdst.raw');
  for (const p of [dst, qdst]) {
    const fd = openSync(p, 'w');
    ftruncateSync(fd, size);
    closeSync(fd);
  }
  const mgr = new JobManager(graph);
  const t0 = performance.now();
  const s = await graph.open({ driver: 'raw', 'node-name': 'src', file: { driver: 'file', filename: src } }, { monitorOwned: true });
  const d = await graph.open({ driver: 'raw', 'node-name': 'dst', file: { driver: 'file', filename: dst } }, { monitorOwned: true });
  const job = await startMirror(mgr, { jobId: 'm', source: s, target: d, sync: 'full', autoComplete: true });
  const r = await job.done;
  if (r.ret !== 0) throw r.ret;
  await d.flush();
  await graph.closeAll();
  const ours = performance.now() - t0;
  const qemu = timed('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, qdst]);
  run('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', dst, src]);
  row(`mirror ${sizeMiB} MiB half zeroes, raw file -> raw file`, ours, qemu);
}

function sparseFile(path: string, size: number): void {
  const fd = openSync(path, 'w');
  ftruncateSync(fd, size);
  closeSync(fd);
}

/** Starts qemu-nbd on a unix socket; resolves once it listens. */
async function qemuNbd(img: string, sock: string): Promise<ChildProcess> {
  const p = spawn('qemu-nbd', ['-f', 'raw', '-t', '-k', sock, '-x', 'exp', img], { stdio: 'ignore' });
  for (let i = 0; i < 500 && !existsSync(sock); i++) await new Promise((r) => setTimeout(r, 10));
  if (!existsSync(sock)) throw new Error('qemu-nbd did not start');
  return p;
}

async function nbdRow(dir: string, src: string, sizeMiB: number): Promise<void> {
  const size = sizeMiB * MiB;
  const ours = join(dir, 'nbd-ours.raw');
  const theirs = join(dir, 'nbd-qemu.raw');
  sparseFile(ours, size);
  sparseFile(theirs, size);
  const s1 = join(dir, 'ours.sock');
  const s2 = join(dir, 'qemu.sock');
  const p1 = await qemuNbd(ours, s1);
  const p2 = await qemuNbd(theirs, s2);
  try {
    const graph = new BlockGraph(createRegistry());
    const mgr = new JobManager(graph);
    const t0 = performance.now();
    const s = await graph.open({ driver: 'raw', 'node-name': 'src', file: { driver: 'file', filename: src } }, { monitorOwned: true });
    const d = await graph.open({ driver: 'nbd', 'node-name': 'dst', server: { type: 'unix', path: s1 }, export: 'exp' }, { monitorOwned: true });
    const job = await startMirror(mgr, { jobId: 'm', source: s, target: d, sync: 'full', autoComplete: true });
    const r = await job.done;
    if (r.ret !== 0) throw r.ret;
    await d.flush();
    await graph.closeAll();
    const oursMs = performance.now() - t0;
    const qemuMs = timed('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, `nbd+unix:///exp?socket=${s2}`]);
    row(`mirror ${sizeMiB} MiB half zeroes into an NBD export (qemu-nbd)`, oursMs, qemuMs);
  } finally {
    p1.kill('SIGTERM');
    p2.kill('SIGTERM');
  }
  run('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', ours, src]);
  run('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', theirs, src]);
}

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'lockstep-bench-jobs-'));
  try {
    await commitRow(dir, arg('--size-commit', 256));
    await mirrorRows(dir, arg('--size-mirror', 1024));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
