// bench/copy-unit: what copy-before-write's unit costs a pair under random 4 KiB writes
// (issue 18: every checkpoint re-arms copy-before-write, so between two checkpoints the first
// write into each unit first copies the unit's old content into the hidden disk).
//
//   pair        fio (nbd engine) 4 KiB random writes at depth 16 to the served disk, with no
//               checkpoints and with the bench taking `--rate` checkpoints per second, for each
//               copy unit (`lockstep pair run --copy-unit`: the hidden disk's cluster size and
//               the copy-before-write unit); the ratio of the two throughputs per unit, CPU per
//               request, and units copied per request (query-replication's bytes-copied over
//               the run). QEMU 7.2's pair with the same graph in the same run (its unit is
//               always max(64 KiB, the hidden disk's cluster size)), checkpointed the way
//               bench/pair does it (COLO-style: load frozen, primary stopped, secondary
//               checkpoint, cont).
//               Every run starts on new images, filled first with data through the pair (1 MiB
//               sequential writes), so that a copy copies data, not zeroes; with checkpoints a
//               checkpoint follows the fill, without the fill has copied every unit already
//               (the steady state of a long run without checkpoints: nothing left to copy).
//   per copy    in process (no NBD, no second daemon): a secondary graph as the pair builds it
//               (qcow2 disk filled with data, active over hidden of the unit's cluster size),
//               one forwarded 4 KiB write at a time into units not copied since the last
//               checkpoint (one every 64 writes, as at 40/s, not timed), against the same
//               writes into units copied already: the difference per write, wall time and
//               CPU, is what one copy costs, including allocating the hidden disk's metadata
//               again after each checkpoint emptied it.
//
// Run: npm run build && node dist/bench/copy-unit.js [--seconds N] [--size-mib N] [--rounds N]
//      [--units 64K,16K,4K] [--rate 40] [--no-qemu]

import { spawn, spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { errorMessage } from '../src/errors.js';
import { parseSize } from '../src/block/options.js';
import { BlockGraph } from '../src/block/graph.js';
import { createRegistry } from '../src/block/registry.js';
import { createQcow2 } from '../src/block/drivers/qcow2/create.js';
import { replicationRegistry } from '../src/replication/registry.js';
import { PAIR_COPY_UNITS } from '../src/pair/setup.js';
import { MiB, cpuSeconds, daemonPids, fio, killLive, nowMs, sh, sleep, within, type BenchContext } from './pair/util.js';
import { newPair, qemuPair, track, type Kind, type Target } from './pair/targets.js';

const KiB = 1024;

interface Options {
  seconds: number;
  sizeMiB: number;
  rounds: number;
  units: number[];
  rate: number;
  withQemu: boolean;
}

function parseOptions(args: string[]): Options {
  const known = new Set(['--seconds', '--size-mib', '--rounds', '--units', '--rate', '--no-qemu']);
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
    const n = v === undefined ? dflt : Number(v);
    if (!Number.isFinite(n) || n <= 0) throw new Error(`--${name} must be a positive number, got '${v}'`);
    return n;
  };
  const units = (opt('units') ?? '64K,16K,4K').split(',').map((u) => {
    const n = parseSize(u);
    if (n === null || !(PAIR_COPY_UNITS as readonly number[]).includes(n)) throw new Error(`--units: '${u}' is not a power of two from 4K to 64K`);
    return n;
  });
  return {
    seconds: num('seconds', 5),
    sizeMiB: num('size-mib', 512),
    rounds: Math.floor(num('rounds', 2)),
    units,
    rate: num('rate', 40),
    withQemu: !args.includes('--no-qemu'),
  };
}

interface Bench extends BenchContext {
  o: Options;
  clockTicks: number;
  root: string | null;
}

/** A served pair, filled and checkpointed; `copied` reads the secondary's bytes-copied (lockstep). */
interface PairTarget extends Target {
  copied?: () => Promise<number>;
}

/** fio's 1 MiB sequential writes over the whole disk (data, so that later copies copy data). */
async function fill(b: Bench, uri: string): Promise<void> {
  const child = spawn('fio', [
    '--name=fill', '--ioengine=nbd', `--uri=${uri}`, '--rw=write', '--bs=1M', '--iodepth=4', `--size=${b.o.sizeMiB}M`, '--thread',
  ], { stdio: ['ignore', 'ignore', 'pipe'] });
  b.live.add(child.pid!);
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  await new Promise<void>((resolve, reject) => {
    child.once('error', reject);
    child.once('exit', (code, signal) => {
      b.live.delete(child.pid!);
      if (code === 0) resolve();
      else reject(new Error(`fio fill ended with ${code ?? signal}: ${err.trim().slice(-1000)}`));
    });
  });
}

async function lockstepTarget(b: Bench, dir: string, unit: number): Promise<PairTarget> {
  // 64 KiB is the default: built without the option, as `lockstep pair run` builds it
  const sup = newPair(b, dir, unit === 64 * KiB ? {} : { copyUnit: unit });
  try {
    await sup.start();
  } catch (e) {
    await sup.stop().catch(() => {});
    throw e;
  }
  const uri = `nbd+unix:///disk?socket=${join(dir, 'disk.sock')}`;
  const t: PairTarget = {
    uri,
    checkpoint: () => sup.checkpoint(),
    pids: daemonPids(sup),
    stop: () => sup.stop(),
    copied: async () => {
      const r = (await sup.call(sup.secondary!, 'query-replication')) as Array<{ 'bytes-copied': number }>;
      return r[0]!['bytes-copied'];
    },
  };
  return t;
}

interface RunResult {
  iops: number;
  p99Us: number;
  cpuUsPerReq: number;
  secondaryUsPerReq: number;
  /** units copied per request (lockstep), NaN when unknown */
  copiesPerReq: number;
  checkpoints: number;
  skipped: number;
}

async function measure(b: Bench, kind: Kind, unit: number, rate: number | null, root: string, seq: number): Promise<RunResult> {
  const dir = join(root, `${kind}-${unit}-${rate ?? 'none'}-${seq}`);
  mkdirSync(dir, { recursive: true });
  const target = track(b, kind === 'lockstep' ? await lockstepTarget(b, dir, unit) : await qemuPair(b, dir)) as PairTarget;
  try {
    await fill(b, target.uri);
    // with checkpoints, the first one empties the hidden disk; without, the fill has copied
    // every unit already and the run copies nothing (a long run's steady state)
    if (rate !== null && !(await target.checkpoint!(null))) throw new Error('the checkpoint after the fill was skipped');
    const copied0 = target.copied ? await target.copied() : NaN;
    const cpu0 = target.pids.map((pid) => cpuSeconds(pid, b.clockTicks));
    const run = fio(b, target.uri, '4k', 16, b.o.seconds);
    let ended = false;
    const done = run.done.finally(() => {
      ended = true;
    });
    let checkpoints = 0;
    let skipped = 0;
    const cps = (async () => {
      if (rate === null) return;
      const period = 1000 / rate;
      const t0 = nowMs();
      for (let k = 1; !ended; ) {
        const wait = t0 + k * period - nowMs();
        if (wait > 0) await sleep(wait);
        if (ended) break;
        if (await target.checkpoint!(run.child)) checkpoints++;
        else skipped++;
        // an overrun earns no burst of catch-up checkpoints
        k = Math.max(k + 1, Math.floor((nowMs() - t0) / period) + 1);
      }
    })();
    const [res] = await Promise.all([done, cps.catch((e: unknown) => {
      run.child.kill('SIGKILL');
      throw e;
    })]);
    const split = target.pids.map((pid, i) => ((cpuSeconds(pid, b.clockTicks) - cpu0[i]!) * 1e6) / res.ios);
    const copies = target.copied ? ((await target.copied()) - copied0) / unit : NaN;
    return {
      iops: res.iops,
      p99Us: res.p99Us,
      cpuUsPerReq: split[0]! + split[1]!,
      secondaryUsPerReq: split[1]!,
      copiesPerReq: copies / res.ios,
      checkpoints,
      skipped,
    };
  } finally {
    await target.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

// ---- per copy, in process ------------------------------------------------------------------

interface CopyCost {
  /** per forwarded 4 KiB write that copies one unit, and per write that copies nothing */
  copyUs: number;
  plainUs: number;
  copyCpuUs: number;
  plainCpuUs: number;
  /** one checkpoint (emptying the hidden disk of CHECKPOINT_EVERY units) */
  checkpointMs: number;
  writes: number;
}

/** In process, a checkpoint every this many writes: about 40/s at 2500 writes/s. */
const CHECKPOINT_EVERY = 64;

async function copyCost(root: string, unit: number): Promise<CopyCost> {
  const dir = join(root, `copy-${unit}`);
  mkdirSync(dir, { recursive: true });
  const size = 256 * MiB;
  const f = (n: string) => join(dir, `${n}.qcow2`);
  await createQcow2(f('disk'), { size });
  await createQcow2(f('active'), { size });
  await createQcow2(f('hidden'), { size, clusterSize: unit });
  const g = new BlockGraph(createRegistry());
  try {
    const disk = await g.open({ driver: 'qcow2', 'node-name': 'disk', file: { driver: 'file', filename: f('disk') } });
    const forward = g.createBackend(disk, { name: 'forward' });
    // data everywhere (a pattern per MiB), so that each copy reads and writes data
    for (let off = 0; off < size; off += MiB) await forward.write(off, Buffer.alloc(MiB, 1 + ((off / MiB) % 250)));
    const repl = await g.open({
      driver: 'replication', 'node-name': 'childs0', mode: 'secondary', 'top-id': 'childs0',
      ...(unit === 64 * KiB ? {} : { 'x-copy-unit': unit }),
      file: {
        driver: 'qcow2', file: { driver: 'file', filename: f('active'), cache: { 'no-flush': true } },
        backing: { driver: 'qcow2', file: { driver: 'file', filename: f('hidden'), cache: { 'no-flush': true } }, backing: 'disk' },
      },
    });
    g.createBackend(repl, { name: 'top' });
    await replicationRegistry(g).startAll('secondary');
    // distinct 64 KiB slots in random order: with every unit each write copies exactly one unit
    const reg = replicationRegistry(g);
    // distinct 64 KiB slots in random order: with every unit each write copies exactly one unit
    const slots = [...Array(size / (64 * KiB)).keys()].sort(() => Math.random() - 0.5).slice(0, 3000);
    const data = Buffer.alloc(4 * KiB, 0x5a);
    /** the writes, timed (wall and CPU per write); `every`: a checkpoint (not timed) before each `every` writes */
    const pass = async (every: number | null): Promise<[number, number, number]> => {
      let wall = 0;
      let cpu = 0;
      let cpMs = 0;
      for (let i = 0; i < slots.length; i += every ?? slots.length) {
        if (every !== null) {
          const t = nowMs();
          await reg.doCheckpointAll();
          cpMs += nowMs() - t;
        }
        const c0 = process.cpuUsage();
        const t0 = nowMs();
        for (const s of slots.slice(i, i + (every ?? slots.length))) await forward.write(s * 64 * KiB, data);
        const c = process.cpuUsage(c0);
        wall += nowMs() - t0;
        cpu += c.user + c.system;
      }
      return [(wall * 1000) / slots.length, cpu / slots.length, every === null ? 0 : cpMs / Math.ceil(slots.length / every)];
    };
    await pass(null); // every slot copied once: the next pass copies nothing
    const [plainUs, plainCpuUs] = await pass(null);
    // then as under checkpoints: the hidden disk emptied every CHECKPOINT_EVERY writes, so its
    // metadata (L2 tables, refcount blocks) is allocated again after each
    const [copyUs, copyCpuUs, checkpointMs] = await pass(CHECKPOINT_EVERY);
    return { copyUs, plainUs, copyCpuUs, plainCpuUs, checkpointMs, writes: slots.length };
  } finally {
    await g.closeAll();
    rmSync(dir, { recursive: true, force: true });
  }
}

// ---- report ---------------------------------------------------------------------------------

const f2 = (x: number) => (Number.isFinite(x) ? x.toFixed(2) : '-');
const f0 = (x: number) => (Number.isFinite(x) ? x.toFixed(0) : '-');
const kib = (n: number) => `${n / KiB} KiB`;
/** the median (of an even count, the mean of the middle two) */
const med = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const h = Math.floor(s.length / 2);
  return s.length === 0 ? NaN : s.length % 2 ? s[h]! : (s[h - 1]! + s[h]!) / 2;
};

async function main(b: Bench): Promise<void> {
  const o = b.o;
  for (const tool of ['fio', ...(o.withQemu ? ['qemu-system-x86_64', 'qemu-img'] : [])]) {
    if (spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0) throw new Error(`${tool} is not installed`);
  }
  const root = mkdtempSync(join(tmpdir(), 'lockstep-bench-copy-unit-'));
  b.root = root;
  const started = Date.now();
  const load = () => loadavg().map((x) => x.toFixed(2)).join(' ');
  console.log(`bench/copy-unit: ${o.sizeMiB} MiB disk filled with data, ${o.seconds} s per run, 4 KiB random writes at depth 16, ${o.rounds} round(s)`);
  console.log(`${cpus().length} CPUs, load average at start ${load()}`);
  const md: string[] = [];
  try {
    // the per-copy figures first: the pair runs below load the machine
    md.push('', `One copy, in process (a forwarded 4 KiB write into a unit not yet copied, with a checkpoint every ${CHECKPOINT_EVERY} writes, minus one into a copied unit; depth 1):`, '');
    md.push('| unit | write that copies | write that does not | per copy (wall) | per copy (CPU) | checkpoint |\n|---|---|---|---|---|---|');
    for (const unit of o.units) {
      const c = await copyCost(root, unit);
      md.push(`| ${kib(unit)} | ${f0(c.copyUs)} us | ${f0(c.plainUs)} us | ${f0(c.copyUs - c.plainUs)} us | ${f0(c.copyCpuUs - c.plainCpuUs)} us | ${f2(c.checkpointMs)} ms |`);
      console.log(`copy unit ${kib(unit)}: ${c.writes} writes, ${f0(c.copyUs)} us with a copy, ${f0(c.plainUs)} us without (CPU ${f0(c.copyCpuUs)} / ${f0(c.plainCpuUs)} us)`);
    }
    type Key = string;
    const res = new Map<Key, RunResult[]>();
    const configs: Array<{ kind: Kind; unit: number }> = [
      ...o.units.map((unit) => ({ kind: 'lockstep' as Kind, unit })),
      ...(o.withQemu ? [{ kind: 'qemu' as Kind, unit: 64 * KiB }] : []),
    ];
    let seq = 0;
    for (let round = 0; round < o.rounds; round++) {
      for (const c of configs) {
        for (const rate of [null, o.rate]) {
          const what = `${c.kind} unit ${kib(c.unit)} ${rate === null ? 'no checkpoints' : `${rate} checkpoints/s`}`;
          const r = await within(measure(b, c.kind, c.unit, rate, root, seq++), o.seconds * 1000 + 180_000, what);
          const key = `${c.kind}/${c.unit}/${rate ?? 'none'}`;
          res.set(key, [...(res.get(key) ?? []), r]);
          console.log(`round ${round + 1} ${what}: ${f0(r.iops)} IOPS, clat p99 ${f0(r.p99Us)} us, CPU ${f0(r.cpuUsPerReq)} us/req (secondary ${f0(r.secondaryUsPerReq)}), ` +
            `${f2(r.copiesPerReq)} copies/req${rate === null ? '' : `, ${r.checkpoints} checkpoints${r.skipped ? ` (${r.skipped} skipped)` : ''}`}; load ${load()}`);
        }
      }
    }
    md.push('', `The pair, 4 KiB random writes at depth 16, ${o.sizeMiB} MiB disk filled with data; medians of ${o.rounds} round(s):`, '');
    md.push(`| pair | unit | IOPS, none | IOPS, ${o.rate}/s | ${o.rate}/s vs none | CPU/req none / ${o.rate}/s | secondary CPU/req none / ${o.rate}/s | copies/req at ${o.rate}/s | secondary CPU per copy |\n|---|---|---|---|---|---|---|---|---|`);
    const m = (key: string, f: (r: RunResult) => number) => med((res.get(key) ?? []).map(f));
    const qemuAt = o.withQemu ? m(`qemu/${64 * KiB}/${o.rate}`, (r) => r.iops) : NaN;
    for (const c of configs) {
      const none = `${c.kind}/${c.unit}/none`;
      const at = `${c.kind}/${c.unit}/${o.rate}`;
      const copies = m(at, (r) => r.copiesPerReq);
      const perCopy = (m(at, (r) => r.secondaryUsPerReq) - m(none, (r) => r.secondaryUsPerReq)) / copies;
      md.push(
        `| ${c.kind === 'lockstep' ? 'lockstep' : 'QEMU 7.2'} | ${kib(c.unit)} | ${f0(m(none, (r) => r.iops))} | ${f0(m(at, (r) => r.iops))} | ${f2(m(at, (r) => r.iops) / m(none, (r) => r.iops))} | ` +
          `${f0(m(none, (r) => r.cpuUsPerReq))} / ${f0(m(at, (r) => r.cpuUsPerReq))} us | ${f0(m(none, (r) => r.secondaryUsPerReq))} / ${f0(m(at, (r) => r.secondaryUsPerReq))} us | ` +
          `${f2(copies)} | ${Number.isFinite(perCopy) ? `${f0(perCopy)} us` : '-'} |`,
      );
    }
    if (o.withQemu) {
      md.push('', `lockstep/QEMU IOPS at ${o.rate} checkpoints/s: ${o.units.map((u) => `${kib(u)} ${f2(m(`lockstep/${u}/${o.rate}`, (r) => r.iops) / qemuAt)}`).join(', ')}`);
    }
    console.log(md.join('\n'));
    console.log(`\ntotal ${((Date.now() - started) / 1000).toFixed(0)} s, load average at the end ${load()}`);
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
}

let options: Options;
try {
  options = parseOptions(process.argv.slice(2));
} catch (e) {
  console.error(`bench/copy-unit: ${errorMessage(e)}`);
  process.exit(2);
}
const bench: Bench = { o: options, sizeMiB: options.sizeMiB, live: new Set(), clockTicks: Number(sh('getconf', ['CLK_TCK']).trim()) || 100, root: null };
// the daemons, QEMUs and fios this run started are not children that die with it
const abort = (code: number) => () => {
  killLive(bench);
  if (bench.root) rmSync(bench.root, { recursive: true, force: true });
  process.exit(code);
};
process.once('SIGINT', abort(130));
process.once('SIGTERM', abort(143));
process.stdout.on('error', abort(1));
main(bench).then(
  () => process.exit(0),
  (e: unknown) => {
    console.error(e);
    killLive(bench);
    process.exit(1);
  },
);
