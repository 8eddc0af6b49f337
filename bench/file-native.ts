// Benchmark: the file driver's native paths against QEMU, side by side.
//   map:        block status over a sparse raw file (SEEK_DATA/SEEK_HOLE) vs qemu-img map
//   zero-unmap: write-zeroes with unmap (punch hole)        vs qemu-io write -z -u
//   zero:       write-zeroes without unmap (ZERO_RANGE)     vs qemu-io write -z
// Both sides run as a fresh process per repetition (open, operate, close), so both pay
// their start-up; the lockstep child also reports its in-process time for the operation.
// The first row is the cost of starting a process and opening the image on each side; a
// last row runs lockstep's zeroing with the helper disabled (emulated with zero buffers).
// Usage: node dist/bench/file-native.js [--reps N]
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, openSync, writeSync, closeSync, ftruncateSync, fsyncSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { BlockGraph } from '../src/block/graph.js';
import { createRegistry } from '../src/block/registry.js';
import { loadNative, nativeUnavailableReason } from '../src/util/native.js';

const MiB = 1024 * 1024;
const MAP_SIZE = 1024 * MiB;
const MAP_STRIDE = 32 * 1024; // one 4 KiB data extent every 32 KiB: 32768 extents
const ZERO_SIZE = 128 * MiB;

async function child(op: string, path: string): Promise<void> {
  const g = new BlockGraph(createRegistry());
  const start = process.hrtime.bigint();
  const node = await g.open({ driver: 'file', filename: path });
  let runs = 0;
  if (op === 'open') {
    // start-up, open and close only
  } else if (op === 'map') {
    const size = node.getLength();
    for (let pos = 0; pos < size; runs++) pos += (await node.blockStatus(pos, size - pos)).length;
  } else {
    await node.writeZeroes(0, node.getLength(), { mayUnmap: op === 'zero-unmap' });
    await node.flush();
  }
  await g.closeAll();
  const ms = Number(process.hrtime.bigint() - start) / 1e6;
  process.stdout.write(JSON.stringify({ ms, runs }) + '\n');
}

function timed(cmd: string, args: string[], env?: NodeJS.ProcessEnv): { ms: number; stdout: string } {
  const start = process.hrtime.bigint();
  const r = spawnSync(cmd, args, { encoding: 'utf8', env: env ?? process.env, timeout: 120_000, maxBuffer: 1 << 28 });
  const ms = Number(process.hrtime.bigint() - start) / 1e6;
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed: ${r.error?.message ?? r.stderr}`);
  return { ms, stdout: r.stdout };
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

function makeSparse(path: string): void {
  const fd = openSync(path, 'w');
  const block = Buffer.alloc(4096, 0x5a);
  for (let pos = 0; pos < MAP_SIZE; pos += MAP_STRIDE) writeSync(fd, block, 0, block.length, pos);
  ftruncateSync(fd, MAP_SIZE);
  fsyncSync(fd); // no writeback of the set-up in the timed part
  closeSync(fd);
}

function makeFull(path: string): void {
  const fd = openSync(path, 'w');
  const chunk = Buffer.alloc(8 * MiB, 0xa5);
  for (let pos = 0; pos < ZERO_SIZE; pos += chunk.length) writeSync(fd, chunk, 0, chunk.length, pos);
  fsyncSync(fd);
  closeSync(fd);
}

async function main(): Promise<void> {
  const repsArg = process.argv.indexOf('--reps');
  const reps = repsArg > 0 ? Number(process.argv[repsArg + 1]) : 3;
  if (!loadNative()) throw new Error(`the native helper is required: ${nativeUnavailableReason()}`);
  const self = fileURLToPath(import.meta.url);
  const dir = mkdtempSync(join(tmpdir(), 'lockstep-bench-'));
  const rows: string[] = [];
  try {
    const path = join(dir, 'img.raw');
    const lockstep = (op: string, env?: NodeJS.ProcessEnv): { wall: number; inner: number; runs: number } => {
      const t = timed(process.execPath, [self, 'child', op, path], env);
      const r = JSON.parse(t.stdout) as { ms: number; runs: number };
      return { wall: t.ms, inner: r.ms, runs: r.runs };
    };
    interface Row {
      name: string;
      wall: number;
      inner: number;
      qemu: number;
    }
    const table: Row[] = [];
    const row = (name: string, ours: number[], inner: number[], theirs: number[]): void => {
      table.push({ name, wall: median(ours), inner: median(inner), qemu: median(theirs) });
    };
    const print = (): void => {
      const qemuStart = table[0]!.qemu;
      for (const r of table) {
        const qemuOp = Math.max(r.qemu - qemuStart, 0.1);
        rows.push(
          `| ${r.name} | ${r.wall.toFixed(1)} | ${r.inner.toFixed(1)} | ${r.qemu.toFixed(1)} | ${qemuOp.toFixed(1)} | ` +
            `${(r.wall / r.qemu).toFixed(2)} | ${r === table[0] ? '-' : (r.inner / qemuOp).toFixed(2)} |`,
        );
      }
    };

    makeFull(path);
    const so: number[] = [];
    const si: number[] = [];
    const sq: number[] = [];
    for (let i = 0; i < reps; i++) {
      const r = lockstep('open');
      so.push(r.wall);
      si.push(r.inner);
      sq.push(timed('qemu-io', ['-f', 'raw', '-c', 'flush', path]).ms);
    }
    row('start-up, open, close (no I/O)', so, si, sq);

    makeSparse(path);
    const mo: number[] = [];
    const mi: number[] = [];
    const mq: number[] = [];
    let runs = 0;
    for (let i = 0; i < reps; i++) {
      const r = lockstep('map');
      mo.push(r.wall);
      mi.push(r.inner);
      runs = r.runs;
      mq.push(timed('qemu-img', ['map', '-f', 'raw', '--output=json', path]).ms);
    }
    row(`map 1 GiB sparse raw (${runs} runs)`, mo, mi, mq);

    for (const [op, qargs] of [
      ['zero-unmap', 'write -z -u 0 128M'],
      ['zero', 'write -z 0 128M'],
    ] as const) {
      const o: number[] = [];
      const inner: number[] = [];
      const q: number[] = [];
      for (let i = 0; i < reps; i++) {
        makeFull(path);
        const r = lockstep(op);
        o.push(r.wall);
        inner.push(r.inner);
        makeFull(path);
        q.push(timed('qemu-io', ['-f', 'raw', '-c', qargs, path]).ms);
      }
      row(`${op} 128 MiB of data`, o, inner, q);
    }

    const eo: number[] = [];
    const ei: number[] = [];
    const eq: number[] = [];
    for (let i = 0; i < reps; i++) {
      makeFull(path);
      const r = lockstep('zero', { ...process.env, LOCKSTEP_NATIVE: 'off' });
      eo.push(r.wall);
      ei.push(r.inner);
      makeFull(path);
      eq.push(timed('qemu-io', ['-f', 'raw', '-c', 'write -z 0 128M', path]).ms);
    }
    row('zero 128 MiB, helper off (emulated)', eo, ei, eq);
    print();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  console.log(`file driver native paths, median of ${reps} runs, milliseconds (lower is better)`);
  console.log('wall: the whole process; lockstep in-process: open, operation, close inside the process;');
  console.log('QEMU op: QEMU wall minus its start-up row. ratio op = lockstep in-process / QEMU op');
  console.log('| operation | lockstep wall | lockstep in-process | QEMU wall | QEMU op | ratio wall | ratio op |');
  console.log('|---|---|---|---|---|---|---|');
  for (const r of rows) console.log(r);
}

if (process.argv[2] === 'child') {
  await child(process.argv[3]!, process.argv[4]!);
} else {
  await main();
}
