// Peak memory of `lockstep img convert` against `qemu-img convert` on a deep backing chain,
// in the same run: a 1 GiB qcow2 base and DEPTH (300) qcow2 layers above it, each layer
// writing 4 KiB into the first 2 MiB (so every layer has data in the first chunk a convert
// reads) and 64 KiB at its own MiB further on. Both tools convert the top to raw; the two
// outputs must be identical. Peak RSS is /usr/bin/time's maximum resident set size.
// ratio = lockstep peak / QEMU peak (the goal: at most 2).
// Run: npx tsc -p . && nice -n 10 node dist/bench/chain-memory.js [dir] [depth]

import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, existsSync, mkdtempSync, rmSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const LOCKSTEP = fileURLToPath(new URL('../../bin/lockstep', import.meta.url));

function run(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.error) throw new Error(`${cmd}: ${r.error.message}`);
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.status}): ${r.stderr.trim()}`);
  return r.stderr;
}

/** Runs cmd under /usr/bin/time; returns the peak RSS in bytes and the wall time. */
function peak(cmd: string, args: string[]): { bytes: number; seconds: number } {
  const t0 = process.hrtime.bigint();
  const err = run('/usr/bin/time', ['-f', 'maxrss=%M', cmd, ...args]);
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  const m = /maxrss=(\d+)/.exec(err);
  if (!m) throw new Error(`no maxrss in: ${err}`);
  return { bytes: Number(m[1]) * 1024, seconds };
}

function digest(path: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const h = createHash('sha256');
    createReadStream(path).on('data', (d) => h.update(d)).on('end', () => resolve(h.digest('hex'))).on('error', reject);
  });
}

function buildChain(dir: string, base: string, depth: number): void {
  run('qemu-img', ['create', '-q', '-f', 'qcow2', base, '1G']);
  run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x01 0 2M', '-c', 'write -P 0x02 512M 1M', base]);
  let prev = base;
  for (let i = 1; i <= depth; i++) {
    const layer = join(dir, `layer${i}.qcow2`);
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', prev, layer, '1G']);
    const p = (i % 250) + 3;
    run('qemu-io', ['-f', 'qcow2', '-c', `write -P ${p} ${(i % 512) * 4096} 4k`, '-c', `write -P ${p} ${(8 + i) * 1024 * 1024} 64k`, layer]);
    prev = layer;
  }
}

const mb = (n: number): string => `${(n / 1024 / 1024).toFixed(1)} MB`;

async function main(): Promise<void> {
  const dir = process.argv[2] ?? mkdtempSync(join(tmpdir(), 'lockstep-bench-chain-'));
  const depth = Number(process.argv[3] ?? 300);
  console.log(`machine: ${cpus().length} CPUs, load average at start ${loadavg().map((x) => x.toFixed(1)).join(' ')}`);
  try {
    const base = join(dir, 'layer0.qcow2');
    const top = join(dir, `layer${depth}.qcow2`);
    // a chain left by an earlier run in the same directory is used again
    if (!existsSync(top)) buildChain(dir, base, depth);
    const qOut = join(dir, 'qemu.raw');

    const lOut = join(dir, 'lockstep.raw');
    const q = peak('qemu-img', ['convert', '-O', 'raw', top, qOut]);
    const l = peak(process.execPath, [LOCKSTEP, 'img', 'convert', '-O', 'raw', top, lOut]);
    const same = (await digest(qOut)) === (await digest(lOut));
    console.log(`${depth}-deep qcow2 chain (1 GiB), convert to raw:`);
    console.log(`  qemu-img convert      peak RSS ${mb(q.bytes).padStart(9)}  ${q.seconds.toFixed(2)} s`);
    console.log(`  lockstep img convert  peak RSS ${mb(l.bytes).padStart(9)}  ${l.seconds.toFixed(2)} s`);
    console.log(`  ratio lockstep/QEMU   ${(l.bytes / q.bytes).toFixed(2)} (goal: at most 2.00); outputs ${same ? 'identical' : 'DIFFER'}`);
    console.log(`load average at end ${loadavg().map((x) => x.toFixed(1)).join(' ')}`);
    if (!same) process.exitCode = 1;
  } finally {
    if (process.argv[2] === undefined) rmSync(dir, { recursive: true, force: true });
  }
}

await main();
