// `lockstep img bench` against `qemu-img bench` on qcow2, in the same run and with the
// same parameters: a new 1 GiB image (64 KiB clusters), writeback cache, 64 KiB requests,
// queue depth 16; sequential writes into the new image, then sequential reads of it.
// Each figure is the median of RUNS runs of "Run completed in X seconds" (the I/O loop
// only, as qemu-img bench reports it). ratio = QEMU time / lockstep time, so >= 1.0 means
// lockstep is at least as fast.
// With --uring, a third column runs lockstep with LOCKSTEP_IO_URING=on (file I/O through the
// native helper's io_uring instead of libuv's thread pool), to show what the ring is worth.
// Run: npx tsc -p . && nice -n 10 node dist/bench/qcow2.js [dir] [runs] [--uring]

import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const LOCKSTEP = fileURLToPath(new URL('../../bin/lockstep', import.meta.url));
const SIZE = '1G';
const REQUEST = 64 * 1024;
const COUNT = 2 ** 30 / REQUEST;
const DEPTH = 16;
const CACHE = 'writeback';

type Tool = 'qemu' | 'lockstep' | 'lockstep-uring';

function exec(tool: Tool, args: string[]): string {
  const env = tool === 'lockstep-uring' ? { ...process.env, LOCKSTEP_IO_URING: 'on' } : process.env;
  const r = tool === 'qemu'
    ? spawnSync('qemu-img', args, { encoding: 'utf8' })
    : spawnSync(process.execPath, [LOCKSTEP, 'img', ...args], { encoding: 'utf8', env });
  if (r.error) throw new Error(`${tool}: ${r.error.message}`);
  if (r.status !== 0) throw new Error(`${tool} img ${args.join(' ')} failed: ${r.stderr.trim()}`);
  return r.stdout;
}

function benchSeconds(tool: Tool, image: string, format: string, write: boolean): number {
  const args = ['bench', '-f', format, '-t', CACHE, '-d', String(DEPTH), '-s', String(REQUEST), '-c', String(COUNT)];
  if (write) args.push('-w');
  const out = exec(tool, [...args, image]);
  const m = /Run completed in (\d+\.\d+) seconds\./.exec(out);
  if (!m) throw new Error(`${tool}: unexpected bench output: ${out}`);
  return Number(m[1]);
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

function main(): void {
  const withRing = process.argv.includes('--uring');
  const argv = process.argv.slice(2).filter((a) => a !== '--uring');
  const dir = argv[0] ?? mkdtempSync(join(tmpdir(), 'lockstep-bench-qcow2-'));
  const runs = Number(argv[1] ?? 3);
  const tools: Tool[] = withRing ? ['qemu', 'lockstep', 'lockstep-uring'] : ['qemu', 'lockstep'];
  const results: Record<string, Record<Tool, number[]>> = {};
  const record = (name: string, tool: Tool, seconds: number): void => {
    (results[name] ??= { qemu: [], lockstep: [], 'lockstep-uring': [] })[tool].push(seconds);
  };
  try {
    for (let i = 0; i < runs; i++) {
      for (const format of ['qcow2', 'raw']) {
        for (const tool of tools) {
          const image = join(dir, `${tool}.${format}`);
          rmSync(image, { force: true });
          // each tool creates its own image, as a user would
          const opts = format === 'qcow2' ? ['-o', 'cluster_size=64k'] : [];
          exec(tool, ['create', '-q', '-f', format, ...opts, image, SIZE]);
          record(`${format} seq write`, tool, benchSeconds(tool, image, format, true));
          record(`${format} seq read`, tool, benchSeconds(tool, image, format, false));
          rmSync(image, { force: true });
        }
      }
    }
  } finally {
    if (argv[0] === undefined) rmSync(dir, { recursive: true, force: true });
  }
  console.log(`load average ${loadavg().map((x) => x.toFixed(1)).join(' ')}`);
  console.log(`${SIZE} images (qcow2: 64 KiB clusters), ${REQUEST / 1024} KiB requests x ${COUNT}, depth ${DEPTH}, cache ${CACHE}; median of ${runs}`);
  for (const [name, r] of Object.entries(results)) {
    const q = median(r.qemu);
    const l = median(r.lockstep);
    let line = `${name.padEnd(16)} qemu-img ${q.toFixed(3)} s (${(1024 / q).toFixed(0)} MiB/s)  lockstep ${l.toFixed(3)} s (${(1024 / l).toFixed(0)} MiB/s)  ratio ${(q / l).toFixed(2)}`;
    if (withRing) {
      const f = median(r['lockstep-uring']);
      line += `  lockstep-uring ${f.toFixed(3)} s  ratio ${(q / f).toFixed(2)}`;
    }
    console.log(line);
  }
}

main();
