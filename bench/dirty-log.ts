// bench/dirty-log: what the dirty-log filter (the pair's crash-safe record of changed
// regions) costs the primary's writes, against QEMU 7.2's nearest equivalent in the same run.
//
//   load     fio (nbd engine) 4 KiB random writes at depth 16 over the whole disk, served by
//            one daemon over NBD (Unix socket) from a new qcow2 image each run.
//   lockstep L0  qcow2, no log
//            X1  dirty-log as the pair sets it up (64 KiB granules, extent-size
//                DIRTY_EXTENT_SIZE = 4 MiB: format 2, the extent persisted before the first
//                write into it, the granule bits in memory), log beside the image, empty
//            H0  L0 with 40 barriers per second (block-io-hold / block-io-release, as the
//                pair takes them around a checkpoint)
//            HX  X1 with 40 checkpoints per second: hold, x-dirty-log-checkpoint, release
//                (the pair's case: lazy rewrites of the whole file once a second, each after
//                a flush of the qcow2 below)
//            L1  dirty-log in the old format 1 (extent = granule = 64 KiB), log empty: every
//                first write into a granule persists it
//            H1  L1 with 40 checkpoints per second
//            W1  L1 with every granule persisted already (x-dirty-log-mark of the disk)
//            H2  H1 with hot-bytes = the disk size (confirmed granules are never dropped)
//   QEMU     Q0  qemu-system-x86_64 -machine none serving the qcow2, no bitmap
//            Q1  the same with a persistent dirty bitmap (block-dirty-bitmap-add
//                persistent=true: kept in memory, written to the image only at close, so
//                it is not crash-safe: the closest QEMU has)
//   ratios   X1/L0, HX/H0 (the pair's log without and with checkpoints; aim >= 0.95), L1/L0,
//            H1/H0, W1/L0, H2/H0 (format 1), Q1/Q0.
// Configs run interleaved (by default L0 X1 H0 HX L1 H1 Q0 Q1, repeated --rounds times);
// medians reported. --configs picks others (W1 and H2 only when named).
//
// Run: npm run build && node dist/bench/dirty-log.js [--seconds N] [--size-mib N] [--rounds N]
//      [--configs L0,X1,...] [--no-qemu] [--dir DIR]
//      (DIR: where images and logs go; default the system temp dir)

import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { createQcow2 } from '../src/block/drivers/qcow2/create.js';
import { DIRTY_EXTENT_SIZE } from '../src/pair/setup.js';
import { startLockstep, startQemu, type Proc } from '../test/helpers/processes.js';
import { MiB, fio, killLive, sleep, type BenchContext, type FioResult } from './pair/util.js';

interface Options {
  seconds: number;
  sizeMiB: number;
  rounds: number;
  withQemu: boolean;
  dir: string;
  configs: Config[];
}

const ALL_CONFIGS = ['L0', 'X1', 'H0', 'HX', 'L1', 'H1', 'W1', 'H2', 'Q0', 'Q1'] as const;
type Config = (typeof ALL_CONFIGS)[number];
const DEFAULT_CONFIGS: Config[] = ['L0', 'X1', 'H0', 'HX', 'L1', 'H1', 'Q0', 'Q1'];

function parseOptions(args: string[]): Options {
  const known = new Set(['--seconds', '--size-mib', '--rounds', '--configs', '--no-qemu', '--dir']);
  for (const a of args) if (a.startsWith('--') && !known.has(a)) throw new Error(`unknown option '${a}' (known: ${[...known].join(', ')})`);
  const opt = (name: string): string | undefined => {
    const i = args.indexOf(`--${name}`);
    if (i < 0) return undefined;
    const v = args[i + 1];
    if (v === undefined || v.startsWith('--')) throw new Error(`--${name} needs a value`);
    return v;
  };
  const num = (name: string, dflt: number): number => {
    const v = opt(name);
    if (v === undefined) return dflt;
    const n = Number(v);
    if (!Number.isFinite(n) || n <= 0) throw new Error(`--${name} must be a positive number, got '${v}'`);
    return n;
  };
  const withQemu = !args.includes('--no-qemu');
  const named = opt('configs')?.split(',');
  for (const c of named ?? []) if (!(ALL_CONFIGS as readonly string[]).includes(c)) throw new Error(`--configs: unknown config '${c}' (known: ${ALL_CONFIGS.join(', ')})`);
  const configs = ((named as Config[] | undefined) ?? DEFAULT_CONFIGS).filter((c) => withQemu || !c.startsWith('Q'));
  return {
    configs,
    seconds: num('seconds', 15),
    sizeMiB: num('size-mib', 1024),
    rounds: Math.floor(num('rounds', 2)),
    withQemu,
    dir: opt('dir') ?? tmpdir(),
  };
}

interface Served {
  proc: Proc;
  uri: string;
  /** the node the barrier and the checkpoints go to */
  top: string;
}

async function serve(proc: Proc, node: string, sock: string): Promise<string> {
  await proc.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
  await proc.qmp.execute('block-export-add', { type: 'nbd', id: 'disk', 'node-name': node, name: 'disk', writable: true });
  return `nbd+unix:///disk?socket=${sock}`;
}

async function start(ctx: BenchContext, dir: string, config: Config): Promise<Served> {
  const image = join(dir, 'disk.qcow2');
  const sock = join(dir, 'disk.sock');
  const qcow2 = { driver: 'qcow2', 'node-name': 'disk0', file: { driver: 'file', filename: image } };
  if (config === 'Q0' || config === 'Q1') {
    const r = spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', image, `${ctx.sizeMiB}M`]);
    if (r.status !== 0) throw new Error(`qemu-img create: ${r.stderr}`);
    const proc = await startQemu(dir, 'qemu', ['-blockdev', JSON.stringify(qcow2)]);
    ctx.live.add(proc.child.pid!);
    if (config === 'Q1') await proc.qmp.execute('block-dirty-bitmap-add', { node: 'disk0', name: 'changed', persistent: true, granularity: 65536 });
    return { proc, uri: await serve(proc, 'disk0', sock), top: 'disk0' };
  }
  await createQcow2(image, { size: ctx.sizeMiB * MiB });
  const withLog = config !== 'L0' && config !== 'H0';
  const proc = await startLockstep(dir, 'lockstep', ['--blockdev', JSON.stringify(qcow2)]);
  ctx.live.add(proc.child.pid!);
  let top = 'disk0';
  if (withLog) {
    const hot = config === 'H2' ? { 'hot-bytes': ctx.sizeMiB * MiB } : {};
    // X1, HX: the pair's format (setup.ts); the others the old one, extent = granule
    const extent = config === 'X1' || config === 'HX' ? { 'extent-size': DIRTY_EXTENT_SIZE } : {};
    await proc.qmp.execute('blockdev-add', { driver: 'dirty-log', 'node-name': 'dl', file: 'disk0', filename: join(dir, 'disk.dlog'), ...hot, ...extent });
    top = 'dl';
    // warm: every granule persisted already, so the writes only pay the in-memory check
    if (config === 'W1') await proc.qmp.execute('x-dirty-log-mark', { 'node-name': 'dl', extents: [{ offset: 0, length: ctx.sizeMiB * MiB }] });
  }
  return { proc, uri: await serve(proc, top, sock), top };
}

/** 40 barriers per second (with a dirty-log checkpoint inside when `checkpoint`) until stopped. */
async function barriers(s: Served, checkpoint: boolean, stopped: () => boolean): Promise<number> {
  let n = 0;
  const t0 = performance.now();
  while (!stopped()) {
    await s.proc.qmp.execute('block-io-hold', { 'node-name': s.top });
    // as the pair does (checkpoint.ts): the log's checkpoint sent back to back with the
    // release, the monitor running them in order, no extra round trip inside the hold
    await Promise.all([...(checkpoint ? [s.proc.qmp.execute('x-dirty-log-checkpoint', { 'node-name': s.top })] : []), s.proc.qmp.execute('block-io-release', { 'node-name': s.top })]);
    n++;
    const next = t0 + (n * 1000) / 40;
    const wait = next - performance.now();
    if (wait > 0) await sleep(wait);
  }
  return n / ((performance.now() - t0) / 1000);
}

interface Result extends FioResult {
  rate: number | null;
  logSyncs?: number;
}

async function measure(ctx: BenchContext, o: Options, root: string, config: Config, round: number): Promise<Result> {
  const dir = mkdtempSync(join(root, `${config}-${round}-`));
  const s = await start(ctx, dir, config);
  try {
    const run = fio(ctx, s.uri, '4k', 16, o.seconds);
    let ended = false;
    void run.done.finally(() => (ended = true)).catch(() => {});
    const rate = config.startsWith('H') ? barriers(s, config !== 'H0', () => ended) : null;
    const r = await run.done;
    return { ...r, rate: rate ? await rate : null };
  } finally {
    const pid = s.proc.child.pid!;
    await s.proc.quit().catch(() => s.proc.kill());
    ctx.live.delete(pid);
    rmSync(dir, { recursive: true, force: true });
  }
}

/** The median; of an even count, the mean of the middle two (quantile() takes the lower). */
function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 === 1 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

async function main(): Promise<void> {
  const o = parseOptions(process.argv.slice(2));
  const ctx: BenchContext = { sizeMiB: o.sizeMiB, live: new Set() };
  const root = mkdtempSync(join(o.dir, 'bench-dirty-log-'));
  const cleanup = (): void => {
    killLive(ctx);
    rmSync(root, { recursive: true, force: true });
  };
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    process.once(sig, () => {
      cleanup();
      process.exit(sig === 'SIGINT' ? 130 : 143);
    });
  }
  const configs = o.configs;
  console.log(`bench/dirty-log: ${o.sizeMiB} MiB qcow2, fio nbd 4 KiB randwrite depth 16, ${o.seconds} s per run, ${o.rounds} rounds, in ${o.dir}; extent-size of X1/HX ${DIRTY_EXTENT_SIZE / MiB} MiB`);
  console.log(`machine: ${cpus().length} CPUs, load average at start ${loadavg().map((x) => x.toFixed(1)).join(' ')}`);
  const results = new Map<Config, Result[]>(configs.map((c) => [c, []]));
  try {
    for (let round = 1; round <= o.rounds; round++) {
      for (const c of configs) {
        const r = await measure(ctx, o, root, c, round);
        results.get(c)!.push(r);
        console.log(`  round ${round} ${c}: ${(r.bwBytes / MiB).toFixed(2)} MiB/s, ${r.iops.toFixed(0)} IOPS, p50 ${r.p50Us.toFixed(0)} us, p99 ${r.p99Us.toFixed(0)} us${r.rate !== null ? `, ${r.rate.toFixed(1)} barriers/s` : ''}`);
      }
    }
  } finally {
    cleanup();
  }
  const iops = (c: Config): number => median(results.get(c)!.map((r) => r.iops));
  const p99 = (c: Config): number => median(results.get(c)!.map((r) => r.p99Us));
  console.log('\n| config | IOPS (median) | p99 us (median) |\n|---|---|---|');
  for (const c of configs) console.log(`| ${c} | ${iops(c).toFixed(0)} | ${p99(c).toFixed(0)} |`);
  console.log(`\nload average at the end ${loadavg().map((x) => x.toFixed(1)).join(' ')}`);
  const ratio = (a: Config, b: Config, what: string): void => {
    if (!results.has(a) || !results.has(b)) return;
    // each round's pair ran next to each other: their ratio moves less with the load
    const each = results.get(a)!.map((r, i) => (r.iops / results.get(b)![i]!.iops).toFixed(3));
    console.log(`${`${a}/${b}`.padEnd(6)} ${what.padEnd(58)} ${(iops(a) / iops(b)).toFixed(3)}x (per round: ${each.join(', ')})`);
  };
  ratio('X1', 'L0', `dirty log, ${DIRTY_EXTENT_SIZE / MiB} MiB extents (the pair's) / none`);
  ratio('HX', 'H0', `the same at 40 checkpoints/s / barriers only`);
  ratio('L1', 'L0', 'dirty log, 64 KiB granules (format 1) / none');
  ratio('H1', 'H0', 'the same at 40 checkpoints/s / barriers only');
  ratio('W1', 'L0', 'format 1, every granule recorded already / none');
  ratio('H2', 'H0', 'format 1 at 40 checkpoints/s, hot-bytes = the disk / barriers');
  ratio('Q1', 'Q0', 'QEMU, persistent dirty bitmap / none');
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
