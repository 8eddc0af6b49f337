// bench/pair-latency: does a guest's first command stall the daemons? A `lockstep pair` and
// QEMU 7.2's pair with the same graph (bench/pair/targets.ts), each serving a disk that a
// guest sees as a block device (nbdfuse + a loop device, test/helpers/guest.ts):
//
//   mkfs        mkfs.ext4 with default options (it discards the whole disk first, then writes
//               its metadata and journal) on a disk of each --sizes-gib
//   fio 1M      fio's nbd engine, 1 MiB random writes at depth 4, --seconds long
//   whole       (--steps whole) ONE discard of the whole disk, then ONE write-zeroes of the
//               whole disk, sent by lockstep's NBD client with extended headers (one request
//               however large; QEMU 7.2's server has none, so its requests are cut into 2 GiB
//               compact ones), first on the never-written disk, then after 1 MiB of data
//               was written in every --written-every MiB and checkpointed (the secondary
//               then saves that much old content). A checkpoint follows every request.
//
// Measured on both daemons of each pair during each step:
//   loop        lockstep only: the daemon's event-loop delay histogram (x-query-event-loop-
//               delay, reset before the step): p99 and max of the interval between 1 ms ticks
//               (1 ms = no delay); the longest turn one request kept the loop busy
//   cpu         lockstep only: the CPU time the daemon's loop thread consumed between two
//               1 ms ticks (x-query-event-loop-delay's turn-cpu), p99 and max: a turn's
//               own cost, GC pauses included, which waiting for a CPU does not inflate
//   QMP         both: round trips of query-version sent every 20 ms on a connection of the
//               bench's own, p99 and max: what a heartbeat sees, comparable between the two
//   base        the bench process's own event-loop delay max over the step (it runs the
//               supervisor and the pings, little else)
//   idle        p99 and max of the event-loop delay of a separate node process that does
//               nothing at all, measured as the daemons measure theirs (1 ms resolution):
//               the machine's own scheduling delay, what a loaded 2-core machine adds to
//               every figure above whatever the daemons do
// and the step's duration, fio's throughput, and for lockstep whether the pair is still
// `protected` afterwards with the heartbeat warnings the supervisor logged.
//
// Run: npm run build && node dist/bench/pair-latency.js [--sizes-gib 1,16] [--seconds 10] [--no-qemu]
//      [--steps mkfs,fio,whole] [--written-every 8]
// Needs root, /dev/fuse, loop devices, nbdfuse, e2fsprogs, fio and QEMU (whole: QEMU only).

import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { PairSupervisor, PAIR_DEFAULTS } from '../src/pair/supervisor.js';
import { QmpClient } from '../src/qmp/client.js';
import { errorMessage } from '../src/errors.js';
import { NbdClient } from '../src/nbd/client/client.js';
import { GuestDisk, canMakeGuest } from '../test/helpers/guest.js';
import { MiB, fio, killLive, nowMs, quantile, sleep, type BenchContext } from './pair/util.js';
import { qemuCheckpoint, qemuPairStart, qemuServe } from './pair/targets.js';

const STEPS = ['mkfs', 'fio', 'whole'] as const;
type Step = (typeof STEPS)[number];

interface Options {
  sizesGiB: number[];
  seconds: number;
  withQemu: boolean;
  steps: Set<Step>;
  /** whole: 1 MiB of data in every this many MiB before the "written" requests */
  writtenEveryMiB: number;
}

function parseOptions(args: string[]): Options {
  const known = new Set(['--sizes-gib', '--seconds', '--no-qemu', '--steps', '--written-every']);
  for (const a of args) if (a.startsWith('--') && !known.has(a)) throw new Error(`unknown option '${a}' (known: ${[...known].join(', ')})`);
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
  return {
    sizesGiB: (opt('sizes-gib') ?? '1,16').split(',').map((v) => positive('--sizes-gib', v)),
    seconds: positive('--seconds', opt('seconds') ?? '10'),
    withQemu: !args.includes('--no-qemu'),
    steps: new Set(
      (opt('steps') ?? 'mkfs,fio').split(',').map((v) => {
        if (!(STEPS as readonly string[]).includes(v)) throw new Error(`--steps: unknown step '${v}' (known: ${STEPS.join(', ')})`);
        return v as Step;
      }),
    ),
    writtenEveryMiB: positive('--written-every', opt('written-every') ?? '8'),
  };
}

/** Pings a QMP connection every 20 ms; the round trips in ms. */
function pinger(qmp: QmpClient): { stop(): Promise<number[]> } {
  const rtts: number[] = [];
  let stopped = false;
  const loop = (async () => {
    while (!stopped) {
      const t0 = nowMs();
      await qmp.execute('query-version');
      rtts.push(nowMs() - t0);
      await sleep(20);
    }
  })();
  return {
    stop: async () => {
      stopped = true;
      await loop.catch(() => {});
      return rtts;
    },
  };
}

/**
 * A node process that does nothing but measure its own event-loop delay (1 ms resolution,
 * as the daemons): `stop` resolves with its p99 and max in ms.
 */
async function idleProbe(ctx: BenchContext): Promise<{ stop(): Promise<{ p99: number; max: number }> }> {
  // 'ready' once it measures: a step shorter than a node start (the whole-disk requests on a
  // never-written disk take milliseconds) would otherwise end before the probe began
  const script = `
    const { monitorEventLoopDelay } = require('node:perf_hooks');
    const h = monitorEventLoopDelay({ resolution: 1 });
    h.enable();
    const keep = setInterval(() => {}, 1000);
    setTimeout(() => process.stdout.write('ready\\n'), 5);
    process.stdin.once('data', () => {
      h.disable();
      clearInterval(keep);
      process.stdout.write(JSON.stringify({ p99: h.percentile(99) / 1e6, max: h.max / 1e6 }));
      process.stdin.destroy();
    });`;
  const child = spawn(process.execPath, ['-e', script], { stdio: ['pipe', 'pipe', 'inherit'] });
  ctx.live.add(child.pid!);
  let out = '';
  let ready: () => void = () => {};
  const isReady = new Promise<void>((r) => (ready = r));
  child.stdout!.on('data', (d: Buffer) => {
    out += d.toString();
    if (out.startsWith('ready\n')) ready();
  });
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  await Promise.race([isReady, exited]);
  return {
    stop: async () => {
      child.stdin!.write('stop\n');
      await exited;
      ctx.live.delete(child.pid!);
      return JSON.parse(out.slice('ready\n'.length)) as { p99: number; max: number };
    },
  };
}

interface SideFigures {
  loopP99?: number;
  loopMax?: number;
  cpuP99?: number;
  cpuMax?: number;
  qmpP99: number;
  qmpMax: number;
}

interface StepResult {
  ms: number;
  primary: SideFigures;
  secondary: SideFigures;
  mbps?: number;
  /** the bench process's own loop delay max, ms */
  baseMax: number;
  /** an idle process's loop delay p99 and max, ms: the machine's scheduling delay */
  idle: { p99: number; max: number };
  note?: string;
}

interface Served {
  uri: string;
  sock: string;
  qmp: { primary: QmpClient; secondary: QmpClient };
  lockstep: boolean;
  /** lockstep: stage and heartbeat warnings so far */
  health(): string;
  /** a checkpoint of the pair; lockstep: resolves with the bytes the secondary has saved into
   *  its hidden disk since it started (the counter the checkpoint refreshes) */
  checkpoint(): Promise<number | undefined>;
  stop(): Promise<void>;
}

async function lockstepServed(ctx: BenchContext, dir: string, sizeGiB: number): Promise<Served> {
  const warnings: string[] = [];
  const sup = new PairSupervisor({
    dataDir: dir,
    size: sizeGiB * 1024 * MiB,
    checkpointIntervalMs: PAIR_DEFAULTS.checkpointIntervalMs,
    heartbeatIntervalMs: PAIR_DEFAULTS.heartbeatIntervalMs,
    heartbeatTimeoutMs: PAIR_DEFAULTS.heartbeatTimeoutMs,
    failover: 'manual',
    nbdSocket: join(dir, 'disk.sock'),
    log: (level, msg) => {
      if (level !== 'info') warnings.push(msg);
    },
  });
  try {
    await sup.start();
  } catch (e) {
    await sup.stop().catch(() => {});
    throw e;
  }
  const pids = sup.pids();
  for (const pid of [pids.primary, pids.secondary]) if (pid !== undefined) ctx.live.add(pid);
  const primary = await QmpClient.open({ type: 'unix', path: join(dir, 'primary.qmp') });
  const secondary = await QmpClient.open({ type: 'unix', path: join(dir, 'secondary.qmp') });
  return {
    uri: `nbd+unix:///disk?socket=${join(dir, 'disk.sock')}`,
    sock: join(dir, 'disk.sock'),
    qmp: { primary, secondary },
    lockstep: true,
    health: () => {
      const late = warnings.filter((w) => /heartbeat/.test(w)).length;
      return `${sup.stage}${late ? `, ${late} heartbeat warnings` : ''}`;
    },
    checkpoint: async () => {
      await sup.checkpoint();
      return sup.status()['hidden-copied-bytes'];
    },
    stop: async () => {
      primary.close();
      secondary.close();
      await sup.stop();
      for (const pid of [pids.primary, pids.secondary]) if (pid !== undefined) ctx.live.delete(pid);
    },
  };
}

async function qemuServed(ctx: BenchContext, dir: string, sizeGiB: number): Promise<Served> {
  const p = await qemuPairStart({ ...ctx, sizeMiB: sizeGiB * 1024 }, dir);
  for (const proc of [p.primary, p.secondary]) ctx.live.add(proc.child.pid!);
  const uri = await qemuServe(p.primary, 'colo-disk0', join(dir, 'disk.sock'));
  return {
    uri,
    sock: join(dir, 'disk.sock'),
    qmp: { primary: p.primary.qmp, secondary: p.secondary.qmp },
    lockstep: false,
    health: () => '',
    checkpoint: async () => {
      // a `stop` slower than 4x the last one is given up (null): after a large request the
      // drain can be; the next attempt finds it done
      for (let i = 0; (await qemuCheckpoint(p, null)) === null; i++) if (i === 3) throw new Error('the QEMU checkpoint was given up 4 times');
      return undefined;
    },
    stop: async () => {
      await p.primary.quit();
      await p.secondary.quit();
      for (const proc of [p.primary, p.secondary]) ctx.live.delete(proc.child.pid!);
    },
  };
}

async function step(ctx: BenchContext, s: Served, work: () => Promise<number | undefined>): Promise<StepResult> {
  const sides = ['primary', 'secondary'] as const;
  if (s.lockstep) for (const side of sides) await s.qmp[side].execute('x-query-event-loop-delay', { reset: true });
  const pings = sides.map((side) => pinger(s.qmp[side]));
  const idle = await idleProbe(ctx);
  const base = monitorEventLoopDelay({ resolution: 1 });
  base.enable();
  const t0 = nowMs();
  const mbps = await work();
  const ms = nowMs() - t0;
  base.disable();
  const idleFig = await idle.stop();
  const rtts = await Promise.all(pings.map((p) => p.stop()));
  const fig = async (i: 0 | 1): Promise<SideFigures> => {
    const f: SideFigures = { qmpP99: quantile(rtts[i]!, 0.99), qmpMax: Math.max(...rtts[i]!) };
    if (s.lockstep) {
      const r = (await s.qmp[sides[i]].execute('x-query-event-loop-delay')) as {
        'p99-ms': number;
        'max-ms': number;
        'turn-cpu'?: { 'p99-ms': number; 'max-ms': number };
      };
      f.loopP99 = r['p99-ms'];
      f.loopMax = r['max-ms'];
      f.cpuP99 = r['turn-cpu']?.['p99-ms'];
      f.cpuMax = r['turn-cpu']?.['max-ms'];
    }
    return f;
  };
  return { ms, primary: await fig(0), secondary: await fig(1), ...(mbps !== undefined ? { mbps } : {}), baseMax: base.max / 1e6, idle: idleFig, note: s.health() };
}

const f1 = (x: number | undefined) => (x === undefined ? '-' : x.toFixed(1));

function row(what: string, kind: string, r: StepResult): void {
  const side = (x: SideFigures) =>
    `${f1(x.loopP99).padStart(6)} ${f1(x.loopMax).padStart(7)} ${f1(x.cpuP99).padStart(5)} ${f1(x.cpuMax).padStart(6)} ${f1(x.qmpP99).padStart(6)} ${f1(x.qmpMax).padStart(7)}`;
  console.log(
    `${what.padEnd(12)} ${kind.padEnd(8)} ${(r.ms / 1000).toFixed(2).padStart(7)} ${(r.mbps === undefined ? '-' : r.mbps.toFixed(0)).padStart(6)}  ` +
      `${side(r.primary)}   ${side(r.secondary)}  ${f1(r.baseMax).padStart(6)}  ${f1(r.idle.p99).padStart(6)} ${f1(r.idle.max).padStart(7)}  ${r.note ?? ''}`,
  );
}

const GiB = 1024 * MiB;
const fmtBytes = (n: number) => (n >= GiB ? `${(n / GiB).toFixed(2)} GiB` : `${(n / MiB).toFixed(1)} MiB`);

/** 1 MiB of data at the start of every `everyMiB` MiB, 8 requests at a time. */
async function writeSpread(c: NbdClient, size: number, everyMiB: number): Promise<number> {
  const data = Buffer.alloc(MiB);
  for (let i = 0; i < MiB; i += 8) data.writeDoubleLE(Math.random() + 1, i);
  const offsets: number[] = [];
  for (let o = 0; o + MiB <= size; o += everyMiB * MiB) offsets.push(o);
  let next = 0;
  await Promise.all(
    Array.from({ length: 8 }, async () => {
      while (next < offsets.length) await c.write(offsets[next++]!, data);
    }),
  );
  await c.flush();
  return offsets.length * MiB;
}

/** Whether the places `writeSpread` wrote (a sample of them) read zeroes now. */
async function readsZero(c: NbdClient, size: number, everyMiB: number): Promise<boolean> {
  const zero = Buffer.alloc(MiB);
  const n = Math.floor(size / (everyMiB * MiB));
  for (const k of [0, Math.floor(n / 2), n - 1]) if (!(await c.read(k * everyMiB * MiB, MiB)).equals(zero)) return false;
  return true;
}

/** The whole-disk requests on one pair: never-written, then written. */
async function wholeSteps(o: Options, ctx: BenchContext, s: Served, kind: string, sizeGiB: number): Promise<void> {
  const size = sizeGiB * GiB;
  const c = await NbdClient.connect({ address: { type: 'unix', path: s.sock }, exportName: 'disk', extendedHeaders: true });
  const how = c.info.extendedHeaders ? 'one request' : `${Math.ceil(size / 0x80000000)} compact requests`;
  try {
    let saved = await s.checkpoint();
    const one = async (what: string, written: number, request: () => Promise<void>) => {
      // the request, then a flush (QEMU answers some requests before their metadata is
      // written: the flush, or the next checkpoint's drain, pays for it)
      let requestMs = 0;
      const r = await step(ctx, s, async () => {
        const t0 = nowMs();
        await request();
        requestMs = nowMs() - t0;
        await c.flush();
        return undefined;
      });
      const zero = written > 0 ? await readsZero(c, size, o.writtenEveryMiB) : true;
      const now = await s.checkpoint();
      const notes = [
        `${how} ${(requestMs / 1000).toFixed(2)} s + flush ${((r.ms - requestMs) / 1000).toFixed(2)} s`,
        ...(written > 0 ? [`${fmtBytes(written)} written before`] : []),
        zero ? 'reads zero' : 'written data still there',
      ];
      if (now !== undefined && saved !== undefined) notes.push(`secondary saved ${fmtBytes(now - saved)}`);
      saved = now;
      r.note = `${notes.join(', ')}${r.note ? `; ${r.note}` : ''}`;
      row(`${what} ${sizeGiB}G`, kind, r);
    };
    await one('trim new', 0, () => c.trim(0, size));
    await one('zero new', 0, () => c.writeZeroes(0, size));
    for (const [what, request] of [
      ['trim written', () => c.trim(0, size)],
      ['zero written', () => c.writeZeroes(0, size)],
    ] as const) {
      const t0 = nowMs();
      const written = await writeSpread(c, size, o.writtenEveryMiB);
      const wMs = nowMs() - t0;
      saved = await s.checkpoint();
      console.log(`${''.padEnd(12)} ${kind.padEnd(8)} (${fmtBytes(written)} written in ${(wMs / 1000).toFixed(1)} s, checkpointed)`);
      await one(what, written, request);
    }
  } finally {
    c.destroy();
  }
}

async function main(o: Options, ctx: BenchContext, root: string): Promise<void> {
  console.log(`bench/pair-latency: ${cpus().length} cores, load ${loadavg().map((x) => x.toFixed(1)).join(' ')}; sizes ${o.sizesGiB.join(', ')} GiB, steps ${[...o.steps].join(', ')}, fio ${o.seconds} s`);
  console.log('                              primary (ms)                                  secondary (ms)');
  console.log('step         server    time s   MB/s  loop99 loopmax cpu99 cpumax  qmp99  qmpmax   loop99 loopmax cpu99 cpumax  qmp99  qmpmax    base  idle99 idlemax  pair afterwards');
  const kinds = o.withQemu ? (['lockstep', 'qemu'] as const) : (['lockstep'] as const);
  let seq = 0;
  for (const sizeGiB of o.sizesGiB) {
    for (const kind of kinds) {
      const dir = join(root, `${kind}-${sizeGiB}-${seq++}`);
      mkdirSync(dir, { recursive: true });
      const s = await (kind === 'lockstep' ? lockstepServed : qemuServed)(ctx, dir, sizeGiB);
      let guest: GuestDisk | null = null;
      try {
        if (o.steps.has('whole')) await wholeSteps(o, ctx, s, kind, sizeGiB);
        if (o.steps.has('mkfs')) {
          guest = await GuestDisk.attach(join(dir, 'guest'), s.uri);
          const g = guest;
          row(`mkfs ${sizeGiB}G`, kind, await step(ctx, s, async () => {
            await g.mkfs();
            return undefined;
          }));
          await g.detach();
          guest = null;
        }
        if (o.steps.has('fio')) {
          row(`fio 1M ${sizeGiB}G`, kind, await step(ctx, s, async () => {
            const r = await fio({ ...ctx, sizeMiB: sizeGiB * 1024 }, s.uri, '1M', 4, o.seconds).done;
            return r.bwBytes / 1e6;
          }));
        }
      } catch (e) {
        console.log(`${kind} ${sizeGiB} GiB: ${errorMessage(e)}`);
      } finally {
        await guest?.detach(true);
        await s.stop().catch(() => {});
        rmSync(dir, { recursive: true, force: true });
      }
    }
  }
}

const o = parseOptions(process.argv.slice(2));
if ((o.steps.has('mkfs') || o.steps.has('fio')) && !canMakeGuest()) throw new Error('bench/pair-latency needs root, /dev/fuse, loop devices, nbdfuse, e2fsprogs and sqlite3');
const ctx: BenchContext = { sizeMiB: 0, live: new Set() };
const root = mkdtempSync(join(tmpdir(), 'lockstep-bench-latency-'));
const abort = (code: number) => () => {
  killLive(ctx);
  rmSync(root, { recursive: true, force: true });
  process.exit(code);
};
process.once('SIGINT', abort(130));
process.once('SIGTERM', abort(143));
try {
  await main(o, ctx, root);
} finally {
  killLive(ctx);
  rmSync(root, { recursive: true, force: true });
}
