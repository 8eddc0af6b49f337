// bench/ordering: what ordering overlapping writes in the primary's quorum (issue 21) costs
// the guest of a `lockstep pair`: fio 4 KiB random writes through the pair built from this
// tree ("after"), through a pair built from a baseline tree without the ordering ("before",
// --baseline DIR), and through QEMU 7.2's pair with the same graph, in the same run,
// rounds interleaved (after, before, QEMU, after, ...), every run on new images.
//
//   4k       random writes over the whole disk at depth 16 (bench/pair's 4 KiB load): requests
//            in flight almost never overlap, so this is the cost of the check itself.
//   4k-hot   random writes within the first 256 KiB at depth 16 (fio --norandommap): about
//            one request in five overlaps one in flight and waits for it; before the change
//            those could leave the two disks different.
//
// The baseline is a build of the commit before the change, e.g.:
//   git archive 4c35a76 | tar -x -C /tmp/base && ln -s $PWD/node_modules /tmp/base/node_modules
//   (cd /tmp/base && npx tsc -p tsconfig.json)
// Run: npm run build && node dist/bench/ordering.js --baseline /tmp/base [--seconds N]
//      [--rounds N] [--size-mib N] [--no-qemu] [--workloads 4k,4k-hot]

import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, existsSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { PairSupervisor, PAIR_DEFAULTS } from '../src/pair/supervisor.js';
import { errorMessage } from '../src/errors.js';
import { MiB, fio, killLive, quantile, within, type BenchContext, type FioResult } from './pair/util.js';
import { qemuPair, track, type Target } from './pair/targets.js';

interface Options {
  baseline: string | null;
  seconds: number;
  rounds: number;
  sizeMiB: number;
  withQemu: boolean;
  workloads: Workload[];
}

interface Workload {
  name: string;
  regionKiB: number | null;
  extra: string[];
}

const WORKLOADS: Workload[] = [
  { name: '4k', regionKiB: null, extra: [] },
  { name: '4k-hot', regionKiB: 256, extra: ['--norandommap'] },
];

function parseOptions(args: string[]): Options {
  const valued = new Set(['--baseline', '--seconds', '--rounds', '--size-mib', '--workloads']);
  const known = new Set([...valued, '--no-qemu']);
  const values = new Map<string, string>();
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (!known.has(a)) throw new Error(`unknown option '${a}' (known: ${[...known].join(', ')})`);
    if (valued.has(a)) {
      const v = args[++i];
      if (v === undefined || v.startsWith('--')) throw new Error(`${a} needs a value`);
      values.set(a, v);
    }
  }
  const positive = (name: string, dflt: number): number => {
    const v = values.get(name);
    if (v === undefined) return dflt;
    const n = Number(v);
    if (!Number.isFinite(n) || n <= 0) throw new Error(`${name} must be a positive number, got '${v}'`);
    return n;
  };
  const names = (values.get('--workloads') ?? '4k,4k-hot').split(',');
  for (const n of names) if (!WORKLOADS.some((w) => w.name === n)) throw new Error(`--workloads: unknown workload '${n}' (known: 4k, 4k-hot)`);
  const baseline = values.get('--baseline') ?? null;
  if (baseline !== null && !existsSync(join(baseline, 'dist/src/pair/supervisor.js'))) {
    throw new Error(`--baseline: ${baseline} has no dist/src/pair/supervisor.js (build the baseline tree first)`);
  }
  return {
    baseline: baseline === null ? null : resolve(baseline),
    seconds: positive('--seconds', 5),
    rounds: Math.floor(positive('--rounds', 3)),
    sizeMiB: positive('--size-mib', 1024),
    withQemu: !args.includes('--no-qemu'),
    workloads: WORKLOADS.filter((w) => names.includes(w.name)),
  };
}

type SupervisorClass = typeof PairSupervisor;

/** A lockstep pair under `Sup` (this tree's supervisor, or the baseline's: its daemons are the baseline's). */
async function pairTarget(ctx: BenchContext, Sup: SupervisorClass, dir: string): Promise<Target> {
  const sup = new Sup({
    dataDir: dir,
    size: ctx.sizeMiB * MiB,
    checkpointIntervalMs: 0,
    heartbeatIntervalMs: PAIR_DEFAULTS.heartbeatIntervalMs,
    // the bench measures throughput on a shared machine, not failure detection
    heartbeatTimeoutMs: 10_000,
    failover: 'manual',
    nbdSocket: join(dir, 'disk.sock'),
    log: (level, msg) => {
      if (level === 'error') console.error(`  [pair] ${msg}`);
    },
  });
  try {
    await sup.start();
  } catch (e) {
    await sup.stop().catch(() => {});
    throw e;
  }
  const p = sup.pids();
  return { uri: `nbd+unix:///disk?socket=${join(dir, 'disk.sock')}`, pids: [p.primary!, p.secondary!], stop: () => sup.stop() };
}

const f1 = (x: number) => (Number.isFinite(x) ? x.toFixed(1) : '-');
const f2 = (x: number) => (Number.isFinite(x) ? x.toFixed(2) : '-');
const us = (x: number) => (Number.isFinite(x) ? `${x.toFixed(0)} us` : '-');
const median = (xs: number[]) => quantile(xs, 0.5);

async function main(o: Options, ctx: BenchContext): Promise<void> {
  for (const tool of ['fio', ...(o.withQemu ? ['qemu-system-x86_64', 'qemu-img'] : [])]) {
    if (spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0) throw new Error(`${tool} is not installed`);
  }
  const kinds: Array<[string, (dir: string) => Promise<Target>]> = [['after', (dir) => pairTarget(ctx, PairSupervisor, dir)]];
  if (o.baseline) {
    const mod = (await import(pathToFileURL(join(o.baseline, 'dist/src/pair/supervisor.js')).href)) as { PairSupervisor: SupervisorClass };
    kinds.push(['before', (dir) => pairTarget(ctx, mod.PairSupervisor, dir)]);
  }
  if (o.withQemu) kinds.push(['QEMU', (dir) => qemuPair(ctx, dir)]);
  const root = mkdtempSync(join(tmpdir(), 'lockstep-bench-ordering-'));
  const load = () => loadavg().map((x) => x.toFixed(2)).join(' ');
  console.log(`bench/ordering: ${o.sizeMiB} MiB disk, ${o.seconds} s per run, ${o.rounds} rounds, fio nbd engine, 4 KiB random writes at depth 16; baseline ${o.baseline ?? '(none)'}`);
  console.log(`${cpus().length} CPUs, load average at start ${load()}`);
  const md: string[] = [];
  try {
    let seq = 0;
    for (const w of o.workloads) {
      const res = new Map<string, FioResult[]>(kinds.map(([k]) => [k, []]));
      for (let round = 0; round < o.rounds; round++) {
        for (const [kind, make] of kinds) {
          const dir = join(root, `${w.name}-${kind}-${seq++}`);
          mkdirSync(dir, { recursive: true });
          const run = async (): Promise<FioResult> => {
            const target = track(ctx, await make(dir));
            try {
              return await fio(ctx, target.uri, '4k', 16, o.seconds, w.regionKiB ?? undefined, w.extra).done;
            } finally {
              await target.stop();
            }
          };
          const r = await within(run(), o.seconds * 1000 + 120_000, `${w.name} ${kind}`);
          rmSync(dir, { recursive: true, force: true });
          res.get(kind)!.push(r);
          console.log(`${w.name} round ${round + 1} ${kind}: ${f1(r.iops)} IOPS, ${f1(r.bwBytes / MiB)} MiB/s, clat p50 ${us(r.p50Us)} p99 ${us(r.p99Us)}`);
        }
      }
      const iops = (k: string) => median(res.get(k)!.map((r) => r.iops));
      const p50 = (k: string) => median(res.get(k)!.map((r) => r.p50Us));
      const p99 = (k: string) => median(res.get(k)!.map((r) => r.p99Us));
      md.push('', `${w.name}: 4 KiB random writes, depth 16${w.regionKiB ? `, within the first ${w.regionKiB} KiB (--norandommap)` : ', whole disk'}; medians of ${o.rounds} runs`, '');
      md.push('| pair | IOPS (runs) | clat p50 | clat p99 |', '|---|---|---|---|');
      for (const [k] of kinds) {
        md.push(`| ${k} | ${f1(iops(k))} (${res.get(k)!.map((r) => r.iops.toFixed(0)).join(', ')}) | ${us(p50(k))} | ${us(p99(k))} |`);
      }
      const ratios: string[] = [];
      if (res.has('before')) ratios.push(`after/before ${f2(iops('after') / iops('before'))}`);
      if (res.has('QEMU')) ratios.push(`after/QEMU ${f2(iops('after') / iops('QEMU'))}`);
      if (res.has('before') && res.has('QEMU')) ratios.push(`before/QEMU ${f2(iops('before') / iops('QEMU'))}`);
      if (ratios.length) md.push('', `IOPS ratios (medians): ${ratios.join(', ')}`);
    }
    console.log(md.join('\n'));
    console.log(`\nload average at the end ${load()}`);
  } finally {
    killLive(ctx);
    rmSync(root, { recursive: true, force: true });
  }
}

const ctx: BenchContext = { sizeMiB: 1024, live: new Set() };
let opts: Options;
try {
  opts = parseOptions(process.argv.slice(2));
} catch (e) {
  console.error(`bench/ordering: ${errorMessage(e)}`);
  process.exit(2);
}
ctx.sizeMiB = opts.sizeMiB;
for (const sig of ['SIGINT', 'SIGTERM'] as const) {
  process.once(sig, () => {
    killLive(ctx);
    process.exit(1);
  });
}
main(opts, ctx).then(
  () => process.exit(0),
  (e: unknown) => {
    console.error(`bench/ordering: ${errorMessage(e)}`);
    killLive(ctx);
    process.exit(1);
  },
);
