// bench/pair: what replication costs the guest of a `lockstep pair`, against QEMU 7.2 with the
// same block graph in the same run (qemu-system-x86_64 -machine none, driven over QMP).
//
//   load        fio (nbd engine) random writes to the served disk: 4 KiB at depth 16 and
//               1 MiB at depth 4; throughput, and completion latency median and p99 (fio's
//               clat percentiles, per request).
//   configs     (a) replication off: one daemon, quorum over a local qcow2, served over NBD
//               (b) the pair, no checkpoints
//               (c) the pair with the bench taking checkpoints at 1, 10, 40 and 100 per
//                   second, one after the other, paced to the rate; the pause of each.
//               Every config starts on new, empty images.
//   QEMU        (a), (b) and (c) with the same graph. QEMU has no block-io-hold and no
//               supervisor, and its secondary aborts when checkpointed under forwarded
//               writes; for (c) the bench checkpoints it the way COLO does with a VM: the
//               load is frozen (SIGSTOP, the guest's vm_stop), the primary drains and
//               flushes (QMP stop), the secondary checkpoints, then cont and SIGCONT.
//   steps       every (c) pause in its three steps (p50 / p99 / max): lockstep's from the
//               supervisor's CheckpointTimes (hold, the secondary's checkpoint, release),
//               QEMU's emulated barrier likewise (freeze + stop, checkpoint, cont + unfreeze).
//               With LOCKSTEP_TRACE=<dir> the daemons also write per-request traces there
//               (src/util/trace.ts; read them with bench/pair-trace.ts).
//   breakdown   at 40/s under the 4 KiB load, the bench takes the checkpoints itself over its
//               own QMP connections and times hold, secondary checkpoint and release apart.
//   CPU         user + system CPU of the serving processes per request (/proc).
//   failover    with heartbeat defaults and the 4 KiB load running, the primary is killed
//               (SIGKILL: the supervisor sees the process exit) or frozen (SIGSTOP: only the
//               heartbeat can tell); time to the 'failed-over' event and to the first
//               successful NBD read of the served disk. QEMU: the primary is killed and the
//               bench runs the failover on the secondary at once (no detection) and exports
//               the recovered disk.
//
// Run: npm run build && node dist/bench/pair.js [--seconds N] [--size-mib N] [--rates 1,10,40,100]
//      [--rounds N] [--no-qemu] [--workloads 4k,1M]

import { spawnSync, type ChildProcess } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { PAIR_DEFAULTS } from '../src/pair/supervisor.js';
import { errorMessage } from '../src/errors.js';
import { QmpClient } from '../src/qmp/client.js';
import {
  MiB, daemonPids, cpuSeconds, fio, firstRead, killLive, nowMs, quantile, sh, sleep, within,
  type BenchContext, type FioResult, type FioRun,
} from './pair/util.js';
import {
  lockstepPair, lockstepSingle, newPair, qemuCheckpoint, qemuPair, qemuPairStart, qemuServe, qemuSingle, track,
  type Kind, type Target,
} from './pair/targets.js';

interface Options {
  seconds: number;
  sizeMiB: number;
  rounds: number;
  rates: number[];
  withQemu: boolean;
  workloads: Array<{ name: string; bs: string; depth: number }>;
}

const WORKLOADS = [
  { name: '4k', bs: '4k', depth: 16 },
  { name: '1M', bs: '1M', depth: 4 },
];

function parseOptions(args: string[]): Options {
  const known = new Set(['--seconds', '--size-mib', '--rounds', '--rates', '--workloads', '--no-qemu']);
  for (const a of args) {
    if (a.startsWith('--') && !known.has(a)) throw new Error(`unknown option '${a}' (known: ${[...known].join(', ')})`);
  }
  const opt = (name: string): string | undefined => {
    const i = args.indexOf(`--${name}`);
    if (i < 0) return undefined;
    const v = args[i + 1];
    if (v === undefined || v.startsWith('--')) throw new Error(`--${name} needs a value`);
    return v;
  };
  const positive = (what: string, v: string): number => {
    const n = Number(v);
    if (!Number.isFinite(n) || n <= 0) throw new Error(`${what} must be a positive number, got '${v}'`);
    return n;
  };
  const num = (name: string, dflt: number): number => {
    const v = opt(name);
    return v === undefined ? dflt : positive(`--${name}`, v);
  };
  const names = (opt('workloads') ?? '4k,1M').split(',');
  for (const n of names) {
    if (!WORKLOADS.some((w) => w.name === n)) throw new Error(`--workloads: unknown workload '${n}' (known: 4k, 1M)`);
  }
  return {
    seconds: num('seconds', 5),
    sizeMiB: num('size-mib', 1024),
    rounds: Math.floor(num('rounds', 3)),
    rates: (opt('rates') ?? '1,10,40,100').split(',').map((r) => positive('--rates', r)),
    withQemu: !args.includes('--no-qemu'),
    workloads: WORKLOADS.filter((w) => names.includes(w.name)),
  };
}

/** The context of one bench run: options, the processes it has running, the kernel's clock rate. */
interface Bench extends BenchContext {
  o: Options;
  clockTicks: number;
  /** the run's scratch directory, once made */
  root: string | null;
}

// ---- one measured run ---------------------------------------------------------------------


interface Pauses {
  pauses: number[];
  holdMs: number[];
  secondaryMs: number[];
  releaseMs: number[];
  /** checkpoints given up (QEMU's emulated barrier only) */
  skipped: number;
  achievedRate: number;
}

interface RunResult extends FioResult, Pauses {
  /** CPU time of the serving processes per request, microseconds: in all, and per process */
  cpuUsPerReq: number;
  cpuSplitUs: number[];
}

/** Checkpoints one after the other, paced to `rate` per second, until `stopped` says so. */
async function driveCheckpoints(
  target: Target,
  load: ChildProcess | null,
  rate: number,
  stopped: () => boolean,
): Promise<Pauses> {
  const period = 1000 / rate;
  const pauses: number[] = [];
  const holdMs: number[] = [];
  const secondaryMs: number[] = [];
  const releaseMs: number[] = [];
  let skipped = 0;
  const t0 = nowMs();
  let k = 1;
  while (!stopped()) {
    const wait = t0 + k * period - nowMs();
    if (wait > 0) await sleep(wait);
    if (stopped()) break;
    const r = await target.checkpoint!(load);
    if (r) {
      pauses.push(r.pauseMs);
      holdMs.push(r.holdMs);
      secondaryMs.push(r.checkpointMs);
      releaseMs.push(r.releaseMs);
    } else skipped++;
    // a checkpoint that overran its slot does not earn a burst of catch-up checkpoints
    k = Math.max(k + 1, Math.floor((nowMs() - t0) / period) + 1);
  }
  return { pauses, holdMs, secondaryMs, releaseMs, skipped, achievedRate: pauses.length / ((nowMs() - t0) / 1000) };
}

async function measure(
  b: Bench,
  kind: Kind,
  config: 'off' | 'pair' | number,
  w: { bs: string; depth: number },
  root: string,
  seq: number,
): Promise<RunResult> {
  const dir = join(root, `${kind}-${String(config)}-${w.bs}-${seq}`);
  mkdirSync(dir, { recursive: true });
  const make = config === 'off' ? (kind === 'lockstep' ? lockstepSingle : qemuSingle) : kind === 'lockstep' ? lockstepPair : qemuPair;
  const target = track(b, await make(b, dir));
  try {
    const cpu0 = target.pids.map((pid) => cpuSeconds(pid, b.clockTicks));
    const run = fio(b, target.uri, w.bs, w.depth, b.o.seconds);
    let ended = false;
    const done = run.done.finally(() => {
      ended = true;
    });
    const cps = typeof config === 'number'
      ? driveCheckpoints(target, run.child, config, () => ended)
      : Promise.resolve({ pauses: [], holdMs: [], secondaryMs: [], releaseMs: [], skipped: 0, achievedRate: 0 });
    // a failed checkpoint must not leave fio running on its own
    const [res, cp] = await Promise.all([done, cps.catch((e: unknown) => {
      run.child.kill('SIGKILL');
      throw e;
    })]);
    const split = target.pids.map((pid, i) => ((cpuSeconds(pid, b.clockTicks) - cpu0[i]!) * 1e6) / res.ios);
    return { ...res, ...cp, cpuUsPerReq: split.reduce((x, y) => x + y, 0), cpuSplitUs: split };
  } finally {
    await target.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Checkpoints at 40/s with no load for `ms`: QMP round trips and an empty secondary checkpoint. */
async function idleCheckpoints(b: Bench, kind: Kind, root: string, ms: number): Promise<number[][]> {
  const dir = join(root, `${kind}-idle`);
  mkdirSync(dir, { recursive: true });
  const target = track(b, await (kind === 'lockstep' ? lockstepPair : qemuPair)(b, dir));
  try {
    const end = nowMs() + ms;
    const r = await driveCheckpoints(target, null, 40, () => nowMs() > end);
    return [r.pauses, r.secondaryMs];
  } finally {
    await target.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * Where a lockstep pause goes, at 40/s under the 4 KiB load: the bench takes the checkpoints
 * itself, with the supervisor's three commands over its own QMP connections to the daemons,
 * and times each step, with a `query-version` round trip to the primary just before as the
 * cost of a bare QMP exchange at that moment.
 */
async function pauseBreakdown(b: Bench, root: string): Promise<Record<string, number[]>> {
  const dir = join(root, 'pause-breakdown');
  mkdirSync(dir, { recursive: true });
  const sup = newPair(b, dir);
  const out: Record<string, number[]> = { rtt: [], hold: [], secondary: [], release: [], pause: [] };
  let p: QmpClient | null = null;
  let s: QmpClient | null = null;
  const pids: number[] = [];
  try {
    await sup.start();
    pids.push(...daemonPids(sup));
    for (const pid of pids) b.live.add(pid);
    p = await QmpClient.open({ type: 'unix', path: join(dir, 'primary.qmp') });
    s = await QmpClient.open({ type: 'unix', path: join(dir, 'secondary.qmp') });
    const run = fio(b, `nbd+unix:///disk?socket=${join(dir, 'disk.sock')}`, '4k', 16, b.o.seconds);
    let ended = false;
    const done = run.done.finally(() => (ended = true));
    const t0 = nowMs();
    for (let k = 1; !ended; k++) {
      const wait = t0 + k * 25 - nowMs();
      if (wait > 0) await sleep(wait);
      if (ended) break;
      const a = nowMs();
      await p.execute('query-version');
      const t1 = nowMs();
      await p.execute('block-io-hold', { 'node-name': 'colo-disk0' });
      const t2 = nowMs();
      await s.execute('xen-colo-do-checkpoint');
      const t3 = nowMs();
      // as the supervisor does: the changed-regions reset back to back with the release
      await Promise.all([p.execute('x-replication-reset-changed'), p.execute('block-io-release', { 'node-name': 'colo-disk0' })]);
      const t4 = nowMs();
      out.rtt!.push(t1 - a);
      out.hold!.push(t2 - t1);
      out.secondary!.push(t3 - t2);
      out.release!.push(t4 - t3);
      out.pause!.push(t4 - t1);
    }
    await done;
    return out;
  } finally {
    p?.close();
    s?.close();
    await sup.stop();
    for (const pid of pids) b.live.delete(pid);
    rmSync(dir, { recursive: true, force: true });
  }
}

// ---- failover -----------------------------------------------------------------------------

interface FailoverTimes {
  eventMs: number;
  servedMs: number;
}

async function lockstepFailover(b: Bench, root: string, round: number, how: 'kill' | 'freeze'): Promise<FailoverTimes> {
  const dir = join(root, `failover-${how}-${round}`);
  mkdirSync(dir, { recursive: true });
  const sup = newPair(b, dir);
  let frozen = 0;
  let load: FioRun | null = null;
  const pids: number[] = [];
  try {
    await sup.start();
    pids.push(...daemonPids(sup));
    for (const pid of pids) b.live.add(pid);
    const sock = join(dir, 'disk.sock');
    load = fio(b, `nbd+unix:///disk?socket=${sock}`, '4k', 16, 60);
    load.done.catch(() => {});
    await sleep(500);
    await sup.checkpoint();
    await sleep(300);
    const failedOver = new Promise<number>((resolve) => sup.once('failed-over', () => resolve(nowMs())));
    const t0 = nowMs();
    if (how === 'kill') sup.crashPrimary();
    else {
      frozen = daemonPids(sup)[0];
      process.kill(frozen, 'SIGSTOP');
    }
    const limit = t0 + 20_000;
    const served = await firstRead(sock, limit);
    const event = await Promise.race([failedOver, sleep(limit - nowMs()).then(() => NaN)]);
    if (Number.isNaN(event)) throw new Error('no failed-over event within 20 s');
    return { eventMs: event - t0, servedMs: served - t0 };
  } finally {
    load?.child.kill('SIGKILL');
    if (frozen) process.kill(frozen, 'SIGKILL');
    await sup.stop();
    for (const pid of pids) b.live.delete(pid);
    rmSync(dir, { recursive: true, force: true });
  }
}

/** QEMU: kill the primary, fail over the secondary at once, export the recovered disk. */
async function qemuFailover(b: Bench, root: string, round: number): Promise<FailoverTimes> {
  const dir = join(root, `qemu-failover-${round}`);
  mkdirSync(dir, { recursive: true });
  const p = await qemuPairStart(b, dir);
  const pids = [p.primary.child.pid!, p.secondary.child.pid!];
  for (const pid of pids) b.live.add(pid);
  let load: FioRun | null = null;
  try {
    const sock = join(dir, 'disk.sock');
    load = fio(b, await qemuServe(p.primary, 'colo-disk0', sock), '4k', 16, 60);
    load.done.catch(() => {});
    await sleep(500);
    await qemuCheckpoint(p, load.child);
    await sleep(300);
    const t0 = nowMs();
    await p.primary.kill();
    const s = p.secondary.qmp;
    await s.execute('xen-set-replication', { enable: false, primary: false, failover: true });
    for (let i = 0; ; i++) {
      const nodes = (await s.execute('query-named-block-nodes')) as Array<{ file: string }>;
      if (!nodes.some((n) => n.file === p.active)) break;
      if (i > 20_000) throw new Error('the QEMU failover commit did not end');
      await sleep(1);
    }
    const eventMs = nowMs() - t0;
    // the same socket path as the lockstep pair: the recovered disk on a new server
    await s.execute('nbd-server-stop');
    rmSync(sock, { force: true });
    await qemuServe(p.secondary, 'childs0', sock);
    const served = await firstRead(sock, t0 + 20_000);
    return { eventMs, servedMs: served - t0 };
  } finally {
    load?.child.kill('SIGKILL');
    await p.primary.kill();
    await p.secondary.quit();
    for (const pid of pids) b.live.delete(pid);
    rmSync(dir, { recursive: true, force: true });
  }
}

// ---- report -------------------------------------------------------------------------------

const f1 = (x: number) => (Number.isFinite(x) ? x.toFixed(1) : '-');
const f2 = (x: number) => (Number.isFinite(x) ? x.toFixed(2) : '-');
const us = (x: number) => (Number.isFinite(x) ? (x >= 1000 ? `${(x / 1000).toFixed(2)} ms` : `${x.toFixed(0)} us`) : '-');

function configName(c: 'off' | 'pair' | number): string {
  return c === 'off' ? '(a) replication off' : c === 'pair' ? '(b) pair, no checkpoints' : `(c) pair, ${c} checkpoints/s`;
}

async function main(b: Bench): Promise<void> {
  const o = b.o;
  for (const tool of ['fio', ...(o.withQemu ? ['qemu-system-x86_64', 'qemu-img'] : [])]) {
    if (spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0) throw new Error(`${tool} is not installed`);
  }
  const root = mkdtempSync(join(tmpdir(), 'lockstep-bench-pair-'));
  b.root = root;
  const started = Date.now();
  const kinds: Kind[] = o.withQemu ? ['lockstep', 'qemu'] : ['lockstep'];
  const configs: Array<'off' | 'pair' | number> = ['off', 'pair', ...o.rates];
  const md: string[] = [];
  const load = () => loadavg().map((x) => x.toFixed(2)).join(' ');
  console.log(`bench/pair: ${o.sizeMiB} MiB disk, ${o.seconds} s per run, fio nbd engine, random writes; every run on new images`);
  console.log(`${cpus().length} CPUs, load average at start ${load()}`);
  try {
    let seq = 0;
    const idle: number[][][] = [];
    for (const kind of kinds) idle.push(await within(idleCheckpoints(b, kind, root, 1500), 60_000, `${kind} idle checkpoints`));
    for (const w of o.workloads) {
      const res = new Map<string, RunResult>();
      const failed = new Map<string, string>();
      for (const c of configs) {
        for (const kind of kinds) {
          const what = `${w.bs} depth ${w.depth} ${configName(c)} ${kind}`;
          let r: RunResult;
          try {
            r = await within(measure(b, kind, c, w, root, seq++), o.seconds * 1000 + 60_000, what);
          } catch (e) {
            // QEMU's side of (c) rests on an emulated barrier: report its failure, go on
            if (kind !== 'qemu' || typeof c !== 'number') throw e;
            failed.set(`${kind}/${String(c)}`, errorMessage(e));
            killLive(b);
            console.log(`${what}: FAILED: ${errorMessage(e)}`);
            continue;
          }
          res.set(`${kind}/${String(c)}`, r);
          const cp = r.pauses.length
            ? `, ${r.pauses.length} checkpoints (${f1(r.achievedRate)}/s${r.skipped ? `, ${r.skipped} skipped` : ''}), pause median ${f2(quantile(r.pauses, 0.5))} ms p99 ${f2(quantile(r.pauses, 0.99))} ms`
            : '';
          console.log(`${w.bs} depth ${w.depth} ${configName(c)} ${kind}: ${f1(r.bwBytes / MiB)} MiB/s, ${r.iops.toFixed(0)} IOPS, clat p50 ${us(r.p50Us)} p99 ${us(r.p99Us)}, CPU ${r.cpuUsPerReq.toFixed(0)} us/request${r.cpuSplitUs.length > 1 ? ` (primary ${r.cpuSplitUs[0]!.toFixed(0)} + secondary ${r.cpuSplitUs[1]!.toFixed(0)})` : ''}${cp}`);
        }
      }
      md.push('', `${w.bs} random writes, iodepth ${w.depth}:`, '');
      md.push(
        o.withQemu
          ? '| config | lockstep MiB/s | IOPS | clat p50 | clat p99 | CPU/req | vs (a) | QEMU MiB/s | IOPS | clat p50 | clat p99 | CPU/req | vs (a) | lockstep/QEMU |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|'
          : '| config | lockstep MiB/s | IOPS | clat p50 | clat p99 | CPU/req | vs (a) |\n|---|---|---|---|---|---|---|',
      );
      for (const c of configs) {
        const cells = [configName(c)];
        for (const kind of kinds) {
          const r = res.get(`${kind}/${String(c)}`);
          const base = res.get(`${kind}/off`)!;
          if (r) cells.push(f1(r.bwBytes / MiB), r.iops.toFixed(0), us(r.p50Us), us(r.p99Us), us(r.cpuUsPerReq), f2(r.bwBytes / base.bwBytes));
          else cells.push('failed', '-', '-', '-', '-', '-');
        }
        if (o.withQemu) {
          const q = res.get(`qemu/${String(c)}`);
          cells.push(q ? f2(res.get(`lockstep/${String(c)}`)!.bwBytes / q.bwBytes) : '-');
        }
        md.push(`| ${cells.join(' | ')} |`);
      }
      md.push('', `${w.bs}: checkpoints (lockstep: pause = hold + secondary checkpoint + release, seen by the supervisor;` +
        ` QEMU: COLO-style: load frozen (SIGSTOP), primary stop (drain + flush), secondary xen-colo-do-checkpoint, cont, SIGCONT)`, '');
      md.push(
        '| rate asked | lockstep rate | pause median | pause p99 | pause max | secondary median | hold+release median | QEMU rate | QEMU pause median | p99 | secondary median |\n|---|---|---|---|---|---|---|---|---|---|---|',
      );
      for (const rate of o.rates) {
        const l = res.get(`lockstep/${rate}`)!;
        const q = res.get(`qemu/${rate}`) ?? null;
        md.push(
          `| ${rate}/s | ${f1(l.achievedRate)}/s | ${f2(quantile(l.pauses, 0.5))} ms | ${f2(quantile(l.pauses, 0.99))} ms | ${f2(quantile(l.pauses, 1))} ms | ` +
            `${f2(quantile(l.secondaryMs, 0.5))} ms | ${f2(quantile(l.pauses.map((x, i) => x - l.secondaryMs[i]!), 0.5))} ms | ${q ? `${f1(q.achievedRate)}/s${q.skipped ? ` (${q.skipped} skipped)` : ''}` : o.withQemu ? 'failed' : '-'} | ${q ? `${f2(quantile(q.pauses, 0.5))} ms` : '-'} | ${q ? `${f2(quantile(q.pauses, 0.99))} ms` : '-'} | ${q ? `${f2(quantile(q.secondaryMs, 0.5))} ms` : '-'} |`,
        );
      }
      if (idle.length) {
        const [lp, ls] = idle[0]!;
        const q = idle[1];
        md.push(
          `| idle, 40/s (no load) | ${lp!.length} taken | ${f2(quantile(lp!, 0.5))} ms | ${f2(quantile(lp!, 0.99))} ms | ${f2(quantile(lp!, 1))} ms | ${f2(quantile(ls!, 0.5))} ms | ` +
            `${f2(quantile(lp!.map((x, i) => x - ls![i]!), 0.5))} ms | ${q ? `${q[0]!.length} taken` : '-'} | ${q ? `${f2(quantile(q[0]!, 0.5))} ms` : '-'} | ${q ? `${f2(quantile(q[0]!, 0.99))} ms` : '-'} | ${q ? `${f2(quantile(q[1]!, 0.5))} ms` : '-'} |`,
        );
      }
      // each step apart: p50 / p99 / max (lockstep from the supervisor's CheckpointTimes)
      md.push('', `${w.bs}: the pause in its steps, p50 / p99 / max (lockstep: block-io-hold, the secondary's xen-colo-do-checkpoint` +
        ` with the dirty log's checkpoint, block-io-release with the resets; QEMU: freeze + stop, xen-colo-do-checkpoint, cont + unfreeze)`, '');
      md.push('| rate | pair | checkpoints | hold | secondary checkpoint | release | pause |\n|---|---|---|---|---|---|---|');
      const pq = (xs: number[]) => `${f2(quantile(xs, 0.5))} / ${f2(quantile(xs, 0.99))} / ${f2(quantile(xs, 1))} ms`;
      for (const rate of o.rates) {
        for (const kind of kinds) {
          const r = res.get(`${kind}/${rate}`);
          if (r) md.push(`| ${rate}/s | ${kind} | ${r.pauses.length} | ${pq(r.holdMs)} | ${pq(r.secondaryMs)} | ${pq(r.releaseMs)} | ${pq(r.pauses)} |`);
        }
      }
      for (const [k, msg] of failed) md.push('', `${k} failed: ${msg}`);
      const at40 = res.get('lockstep/40');
      if (at40) {
        const ratio = at40.bwBytes / res.get('lockstep/off')!.bwBytes;
        const p99 = quantile(at40.pauses, 0.99);
        md.push('', `aim at 40/s, ${w.bs}: throughput ${f2(ratio)}x unreplicated (aim >= 0.8: ${ratio >= 0.8 ? 'reached' : 'NOT reached'}); ` +
          `pause p99 ${f2(p99)} ms (aim < 5 ms: ${p99 < 5 ? 'reached' : 'NOT reached'})`);
      }
    }

    if (o.workloads.some((w) => w.name === '4k')) {
      const pb = await within(pauseBreakdown(b, root), o.seconds * 1000 + 60_000, 'pause breakdown');
      md.push('', `Where a lockstep pause goes (4 KiB load, 40 checkpoints/s taken by the bench over its own QMP connections, ${pb.pause!.length} checkpoints):`, '');
      md.push('| step | median | p99 |\n|---|---|---|');
      const names: Array<[string, string]> = [
        ['rtt', 'bare QMP round trip to the primary (query-version), just before'],
        ['hold', 'block-io-hold on the primary (round trip + drain of in-flight writes and their forwards)'],
        ['secondary', 'xen-colo-do-checkpoint on the secondary'],
        ['release', 'block-io-release on the primary (with x-replication-reset-changed sent just before it)'],
        ['pause', 'pause (hold + checkpoint + release)'],
      ];
      for (const [k, label] of names) md.push(`| ${label} | ${f2(quantile(pb[k]!, 0.5))} ms | ${f2(quantile(pb[k]!, 0.99))} ms |`);
    }

    const budget = PAIR_DEFAULTS.heartbeatTimeoutMs + 1000;
    // a frozen primary on this host is alive with its socket open: stalled, not gone, so the
    // supervisor waits for the long bound (src/pair/liveness.ts) before it is lost
    const frozenBudget = Math.max(5000, 10 * PAIR_DEFAULTS.heartbeatTimeoutMs) + 1000;
    const fo: Record<string, FailoverTimes[]> = { kill: [], freeze: [], qemu: [] };
    for (let r = 0; r < o.rounds; r++) {
      for (const how of ['kill', 'freeze'] as const) {
        const t = await within(lockstepFailover(b, root, r, how), 60_000, `lockstep failover (${how})`);
        fo[how]!.push(t);
        console.log(`failover ${how} round ${r + 1}: failed-over event ${f1(t.eventMs)} ms, first read ${f1(t.servedMs)} ms after the ${how}`);
      }
      if (o.withQemu) {
        const t = await within(qemuFailover(b, root, r), 60_000, 'QEMU failover');
        fo.qemu!.push(t);
        console.log(`failover QEMU round ${r + 1}: commit done ${f1(t.eventMs)} ms, first read ${f1(t.servedMs)} ms after the kill`);
      }
    }
    md.push('', `Failover (4 KiB load running; heartbeat interval ${PAIR_DEFAULTS.heartbeatIntervalMs} ms, timeout ${PAIR_DEFAULTS.heartbeatTimeoutMs} ms; aim: served within ${budget} ms, a frozen local primary within its long bound + 1 s, ${frozenBudget} ms; ${o.rounds} rounds):`, '');
    md.push('| primary | to failed-over median | max | to first read median | max | aim |\n|---|---|---|---|---|---|');
    const foRow = (name: string, xs: FailoverTimes[], aim: number | null) => {
      const e = xs.map((x) => x.eventMs);
      const s = xs.map((x) => x.servedMs);
      const max = quantile(s, 1);
      md.push(`| ${name} | ${f1(quantile(e, 0.5))} ms | ${f1(quantile(e, 1))} ms | ${f1(quantile(s, 0.5))} ms | ${f1(max)} ms | ${aim !== null ? (max <= aim ? 'reached' : 'NOT reached') : '-'} |`);
    };
    foRow('lockstep, killed (SIGKILL; the supervisor sees the exit)', fo.kill!, budget);
    foRow('lockstep, frozen (SIGSTOP; only the heartbeat sees it)', fo.freeze!, frozenBudget);
    if (o.withQemu) {
      foRow('QEMU 7.2, killed; the bench fails over at once (commit, then export)', fo.qemu!, null);
      const ratio = quantile(fo.qemu!.map((x) => x.servedMs), 0.5) / quantile(fo.kill!.map((x) => x.servedMs), 0.5);
      md.push('', `killed primary, time to first read, QEMU/lockstep median: ${f2(ratio)} (>1: lockstep faster)`);
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
  console.error(`bench/pair: ${errorMessage(e)}`);
  process.exit(2);
}
const bench: Bench = { o: options, sizeMiB: options.sizeMiB, live: new Set(), clockTicks: Number(sh('getconf', ['CLK_TCK']).trim()) || 100, root: null };
// Interrupted (Ctrl-C, a timeout, a closed pipe on stdout): the daemons, QEMUs and fios this
// run started are not children that die with it, so end them first.
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
