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
//   failover    with heartbeat defaults and the 4 KiB load running, the primary is killed
//               (SIGKILL: the supervisor sees the process exit) or frozen (SIGSTOP: only the
//               heartbeat can tell); time to the 'failed-over' event and to the first
//               successful NBD read of the served disk. QEMU: the primary is killed and the
//               bench runs the failover on the secondary at once (no detection) and exports
//               the recovered disk.
//
// Run: npm run build && node dist/bench/pair.js [--seconds N] [--size-mib N] [--rates 1,10,40,100]
//      [--rounds N] [--no-qemu] [--workloads 4k,1M]

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { PairSupervisor, PAIR_DEFAULTS } from '../src/pair/supervisor.js';
import { NbdClient } from '../src/nbd/client/client.js';
import { createQcow2 } from '../src/block/drivers/qcow2/create.js';
import { errorMessage } from '../src/errors.js';
import { startLockstep, startQemu, type Proc } from '../test/helpers/processes.js';

const MiB = 1024 * 1024;
const args = process.argv.slice(2);
function opt(name: string): string | undefined {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : undefined;
}
function num(name: string, dflt: number): number {
  const v = opt(name);
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!Number.isFinite(n) || n <= 0) throw new Error(`--${name} must be a positive number, got '${v}'`);
  return n;
}
const SECONDS = num('seconds', 5);
const SIZE_MIB = num('size-mib', 1024);
const ROUNDS = num('rounds', 3);
const RATES = (opt('rates') ?? '1,10,40,100').split(',').map((s) => {
  const n = Number(s);
  if (!Number.isFinite(n) || n <= 0) throw new Error(`--rates: '${s}' is not a positive number`);
  return n;
});
const WITH_QEMU = !args.includes('--no-qemu');
const WORKLOADS = [
  { name: '4k', bs: '4k', depth: 16 },
  { name: '1M', bs: '1M', depth: 4 },
].filter((w) => (opt('workloads') ?? '4k,1M').split(',').includes(w.name));

type Kind = 'lockstep' | 'qemu';

// ---- helpers ------------------------------------------------------------------------------

function sh(cmd: string, a: string[]): string {
  const r = spawnSync(cmd, a, { encoding: 'utf8', maxBuffer: 64 * MiB });
  if (r.status !== 0) throw new Error(`${cmd} ${a.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

/** Every server process this bench started (directly or through a supervisor), until stopped. */
const live = new Set<number>();

/** Ends, by pid, whatever this bench started that is still running. */
function killLive(): void {
  for (const pid of live) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
  live.clear();
}

/** Rejects when `p` has not settled within `ms`: a stuck step must not hang the bench. */
function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not finish within ${ms} ms`)), ms);
  });
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const nowMs = () => Number(process.hrtime.bigint()) / 1e6;

function quantile(xs: number[], q: number): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1))]!;
}

interface FioResult {
  bwBytes: number;
  iops: number;
  p50Us: number;
  p99Us: number;
  ios: number;
}

interface FioRun {
  child: ChildProcess;
  done: Promise<FioResult>;
}

/** Starts fio's nbd engine on `uri`; resolves with its figures when it ends. */
function fio(uri: string, bs: string, depth: number, seconds: number): FioRun {
  const child = spawn('fio', [
    '--name=load', '--ioengine=nbd', `--uri=${uri}`, '--rw=randwrite', `--bs=${bs}`, `--iodepth=${depth}`,
    `--size=${SIZE_MIB}M`, '--time_based', `--runtime=${seconds}`, '--output-format=json', '--randrepeat=0',
    // threads, not a forked job process: SIGSTOP on fio must freeze the load itself
    '--thread',
  ], { stdio: ['ignore', 'pipe', 'pipe'] });
  live.add(child.pid!);
  child.once('exit', () => live.delete(child.pid!));
  let out = '';
  let err = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const done = new Promise<FioResult>((resolve, reject) => {
    child.once('error', reject);
    child.once('exit', (code, signal) => {
      if (code !== 0) return reject(new Error(`fio on ${uri} ended with ${code ?? signal}: ${err.trim().slice(-2000)}`));
      const j = JSON.parse(out.slice(out.indexOf('{'))) as {
        jobs: Array<{ write: { bw_bytes: number; iops: number; total_ios: number; clat_ns: { percentile?: Record<string, number> } } }>;
      };
      const w = j.jobs[0]!.write;
      const pct = w.clat_ns.percentile ?? {};
      resolve({ bwBytes: w.bw_bytes, iops: w.iops, p50Us: (pct['50.000000'] ?? NaN) / 1000, p99Us: (pct['99.000000'] ?? NaN) / 1000, ios: w.total_ios });
    });
  });
  return { child, done };
}

/** A served disk under load: the NBD URI, and for a pair a way to take a checkpoint. */
interface Target {
  uri: string;
  /** one checkpoint (under the load `load`, if any); resolves with [pause ms, secondary checkpoint ms] */
  checkpoint?: (load: ChildProcess | null) => Promise<[number, number] | null>;
  /** the processes that serve and replicate, for CPU accounting */
  pids: number[];
  stop(): Promise<void>;
}

// ---- lockstep -----------------------------------------------------------------------------

async function lockstepSingle(dir: string): Promise<Target> {
  const local = join(dir, 'primary.qcow2');
  await createQcow2(local, { size: SIZE_MIB * MiB });
  const sock = join(dir, 'disk.sock');
  const proc = await startLockstep(dir, 'single', [
    '--blockdev', `driver=qcow2,node-name=local0,file.driver=file,file.filename=${local}`,
    '--blockdev', 'driver=quorum,node-name=colo-disk0,read-pattern=fifo,vote-threshold=1,children.0=local0',
  ]);
  await proc.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
  await proc.qmp.execute('block-export-add', { type: 'nbd', id: 'disk', 'node-name': 'colo-disk0', name: 'disk', writable: true });
  return { uri: `nbd+unix:///disk?socket=${sock}`, pids: [proc.child.pid!], stop: () => proc.quit() };
}

function newPair(dir: string, heartbeat = { heartbeatIntervalMs: 100, heartbeatTimeoutMs: 500 }): PairSupervisor {
  return new PairSupervisor({
    dataDir: dir,
    size: SIZE_MIB * MiB,
    checkpointIntervalMs: 0,
    ...heartbeat,
    failover: 'auto',
    nbdSocket: join(dir, 'disk.sock'),
    log: (level, msg) => {
      if (level === 'error') console.error(`  [pair] ${msg}`);
    },
  });
}

async function lockstepPair(dir: string): Promise<Target> {
  const sup = newPair(dir);
  await sup.start();
  return {
    uri: `nbd+unix:///disk?socket=${join(dir, 'disk.sock')}`,
    checkpoint: async () => {
      const r = await sup.checkpoint();
      return [r.pauseMs, r.checkpointMs];
    },
    pids: [childPid(join(dir, 'primary.qmp')), childPid(join(dir, 'secondary.qmp'))],
    stop: () => sup.stop(),
  };
}

// ---- QEMU (same graph) --------------------------------------------------------------------

async function qemuPrimary(dir: string, local: string): Promise<Proc> {
  return startQemu(dir, 'primary', [
    '-drive', `if=none,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,children.0.driver=qcow2,children.0.file.filename=${local}`,
  ]);
}

async function qemuServe(proc: Proc, device: string, sock: string): Promise<string> {
  await proc.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
  await proc.qmp.execute('nbd-server-add', { device, name: 'disk', writable: true });
  return `nbd+unix:///disk?socket=${sock}`;
}

async function qemuSingle(dir: string): Promise<Target> {
  const local = join(dir, 'primary.qcow2');
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', local, `${SIZE_MIB}M`]);
  const proc = await qemuPrimary(dir, local);
  const uri = await qemuServe(proc, 'colo-disk0', join(dir, 'disk.sock'));
  return { uri, pids: [proc.child.pid!], stop: () => proc.quit() };
}

interface QemuPair {
  primary: Proc;
  secondary: Proc;
  secSock: string;
  active: string;
  /** how long the last `stop` that drained took (the barrier's time limit follows it) */
  lastStopMs: number;
}

async function qemuPairStart(dir: string): Promise<QemuPair> {
  const f = (n: string) => join(dir, n);
  for (const n of ['primary.qcow2', 'secondary.qcow2', 'active.qcow2', 'hidden.qcow2']) {
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', f(n), `${SIZE_MIB}M`]);
  }
  const secSock = f('secondary-nbd.sock');
  const secondary = await startQemu(dir, 'secondary', [
    '-drive', `if=none,id=parent0,driver=qcow2,file.filename=${f('secondary.qcow2')}`,
    '-drive',
    `if=none,id=childs0,driver=replication,mode=secondary,top-id=childs0,file.driver=qcow2,file.file.filename=${f('active.qcow2')},` +
      `file.backing.driver=qcow2,file.backing.file.filename=${f('hidden.qcow2')},file.backing.backing=parent0`,
  ]);
  await secondary.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: secSock } } });
  await secondary.qmp.execute('nbd-server-add', { device: 'parent0', writable: true });
  const primary = await qemuPrimary(dir, f('primary.qcow2'));
  // the same start order as the supervisor: initial sync, secondary, then the primary's filter
  await primary.qmp.execute('drive-mirror', {
    'job-id': 'resync', device: 'colo-disk0', target: `nbd+unix:///parent0?socket=${secSock}`, mode: 'existing', format: 'raw', sync: 'full',
  });
  await primary.qmp.waitEvent('BLOCK_JOB_READY', (d) => d.device === 'resync', 60_000);
  await primary.qmp.execute('block-job-cancel', { device: 'resync' });
  await primary.qmp.waitEvent('BLOCK_JOB_COMPLETED', (d) => d.device === 'resync', 60_000);
  await secondary.qmp.execute('xen-set-replication', { enable: true, primary: false });
  await primary.qmp.execute('blockdev-add', {
    driver: 'replication', 'node-name': 'replication0', mode: 'primary',
    file: { driver: 'nbd', server: { type: 'unix', path: secSock }, export: 'parent0' },
  });
  await primary.qmp.execute('x-blockdev-change', { parent: 'colo-disk0', node: 'replication0' });
  await primary.qmp.execute('xen-set-replication', { enable: true, primary: true });
  return { primary, secondary, secSock, active: f('active.qcow2'), lastStopMs: 250 };
}

/**
 * QEMU has no block-io-hold, and xen-colo-do-checkpoint under forwarded writes aborts its
 * secondary ("First cluster in emptied image is in use"). So the checkpoint is taken the way
 * COLO takes it with a VM: the guest stops (the load is frozen with SIGSTOP), the primary
 * drains and flushes (`stop`), the secondary checkpoints, and both resume.
 * When fio is frozen between a request's header and its payload, QEMU's drain waits for the
 * payload forever: past a limit (4x the last good `stop`, within 50..1000 ms: `stop` also
 * flushes, which legitimately takes longer at low rates) the load is let go, the barrier
 * given up and the checkpoint skipped (null); the stall stays in the throughput figures. Requests that fio sent before the freeze and that QEMU had not
 * yet read can still arrive during the checkpoint: a residual race of this emulation.
 * Resolves with [pause ms, secondary checkpoint ms], or null when skipped.
 */
async function qemuCheckpoint(p: QemuPair, load: ChildProcess | null): Promise<[number, number] | null> {
  const t0 = nowMs();
  load?.kill('SIGSTOP');
  let frozen = load !== null;
  try {
    const stopped = p.primary.qmp.execute('stop');
    const limit = Math.min(1000, Math.max(50, 4 * p.lastStopMs));
    const drained = await Promise.race([stopped.then(() => true), sleep(limit).then(() => false)]);
    if (!drained) {
      load?.kill('SIGCONT');
      frozen = false;
      await stopped;
      await p.primary.qmp.execute('cont');
      return null;
    }
    const t1 = nowMs();
    p.lastStopMs = t1 - t0;
    await p.secondary.qmp.execute('xen-colo-do-checkpoint');
    const t2 = nowMs();
    await p.primary.qmp.execute('cont');
    return [nowMs() - t0, t2 - t1];
  } finally {
    if (frozen) load?.kill('SIGCONT');
  }
}

async function qemuPair(dir: string): Promise<Target> {
  const p = await qemuPairStart(dir);
  const uri = await qemuServe(p.primary, 'colo-disk0', join(dir, 'disk.sock'));
  return {
    uri,
    checkpoint: (load) => qemuCheckpoint(p, load),
    pids: [p.primary.child.pid!, p.secondary.child.pid!],
    stop: async () => {
      await p.primary.quit();
      await p.secondary.quit();
    },
  };
}

// ---- one measured run ---------------------------------------------------------------------

/** Records the target's processes in `live` until it is stopped. */
function track(t: Target): Target {
  for (const pid of t.pids) live.add(pid);
  const stop = t.stop;
  return {
    ...t,
    stop: async () => {
      await stop();
      for (const pid of t.pids) live.delete(pid);
    },
  };
}

interface RunResult extends FioResult {
  pauses: number[];
  secondaryMs: number[];
  achievedRate: number;
  /** checkpoints given up (QEMU's emulated barrier only) */
  skipped: number;
  /** CPU time of the serving processes per request, microseconds */
  cpuUsPerReq: number;
}

/** Checkpoints one after the other, paced to `rate` per second, until `stopped` says so. */
async function driveCheckpoints(
  target: Target,
  load: ChildProcess | null,
  rate: number,
  stopped: () => boolean,
): Promise<{ pauses: number[]; secondaryMs: number[]; skipped: number; achievedRate: number }> {
  const period = 1000 / rate;
  const pauses: number[] = [];
  const secondaryMs: number[] = [];
  let skipped = 0;
  const t0 = nowMs();
  let k = 1;
  while (!stopped()) {
    const wait = t0 + k * period - nowMs();
    if (wait > 0) await sleep(wait);
    if (stopped()) break;
    const r = await target.checkpoint!(load);
    if (r) {
      pauses.push(r[0]);
      secondaryMs.push(r[1]);
    } else skipped++;
    // a checkpoint that overran its slot does not earn a burst of catch-up checkpoints
    k = Math.max(k + 1, Math.floor((nowMs() - t0) / period) + 1);
  }
  return { pauses, secondaryMs, skipped, achievedRate: pauses.length / ((nowMs() - t0) / 1000) };
}

async function measure(
  kind: Kind,
  config: 'off' | 'pair' | number,
  w: { bs: string; depth: number },
  root: string,
  seq: number,
): Promise<RunResult> {
  const dir = join(root, `${kind}-${String(config)}-${w.bs}-${seq}`);
  mkdirSync(dir, { recursive: true });
  const target = track(
    await (config === 'off' ? (kind === 'lockstep' ? lockstepSingle(dir) : qemuSingle(dir)) : kind === 'lockstep' ? lockstepPair(dir) : qemuPair(dir)),
  );
  try {
    const cpu0 = target.pids.map(cpuSeconds);
    const run = fio(target.uri, w.bs, w.depth, SECONDS);
    let ended = false;
    const done = run.done.finally(() => {
      ended = true;
    });
    const cps = typeof config === 'number'
      ? driveCheckpoints(target, run.child, config, () => ended)
      : Promise.resolve({ pauses: [], secondaryMs: [], skipped: 0, achievedRate: 0 });
    // a failed checkpoint must not leave fio running on its own
    const [res, cp] = await Promise.all([done, cps.catch((e: unknown) => {
      run.child.kill('SIGKILL');
      throw e;
    })]);
    const cpu = target.pids.reduce((a, pid, i) => a + cpuSeconds(pid) - cpu0[i]!, 0);
    return { ...res, ...cp, cpuUsPerReq: (cpu * 1e6) / res.ios };
  } finally {
    await target.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

// ---- failover -----------------------------------------------------------------------------

/**
 * Reads 4 KiB from the served disk until it works; resolves with the time it first did.
 * Attempts overlap (a new one every 5 ms): a connection to a frozen primary hangs until its
 * timeout, and must not hide the moment the secondary starts serving.
 */
async function firstRead(sock: string, deadlineMs: number): Promise<number> {
  const attempt = async (): Promise<number> => {
    const c = await NbdClient.connect({ address: { type: 'unix', path: sock }, exportName: 'disk', connectTimeoutMs: 250 });
    const read = c.read(0, 4096);
    const timeout = sleep(250).then(() => {
      throw new Error('read timed out');
    });
    try {
      await Promise.race([read, timeout]);
      return nowMs();
    } finally {
      read.catch(() => {});
      void c.disconnect().catch(() => {});
    }
  };
  return new Promise<number>((resolve, reject) => {
    let pending = 0;
    let settled = false;
    const tick = (): void => {
      if (settled) return;
      if (nowMs() > deadlineMs) {
        settled = true;
        reject(new Error(`no successful read from ${sock} before the deadline`));
        return;
      }
      if (pending < 200) {
        pending++;
        attempt().then(
          (t) => {
            pending--;
            if (!settled) {
              settled = true;
              resolve(t);
            }
          },
          () => {
            pending--;
          },
        );
      }
      setTimeout(tick, 5);
    };
    tick();
  });
}

const CLK_TCK = Number(sh('getconf', ['CLK_TCK']).trim()) || 100;

/** User + system CPU seconds of a process so far (Linux /proc). */
function cpuSeconds(pid: number): number {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = f.slice(f.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / CLK_TCK;
}

/** Checkpoints at 40/s with no load for `ms`: QMP round trips and an empty secondary checkpoint. */
async function idleCheckpoints(kind: Kind, root: string, ms: number): Promise<number[][]> {
  const dir = join(root, `${kind}-idle`);
  mkdirSync(dir, { recursive: true });
  const target = track(await (kind === 'lockstep' ? lockstepPair(dir) : qemuPair(dir)));
  try {
    const end = nowMs() + ms;
    const r = await driveCheckpoints(target, null, 40, () => nowMs() > end);
    return [r.pauses, r.secondaryMs];
  } finally {
    await target.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

/** The pid of our child `lockstep daemon` whose command line names `marker` (Linux /proc). */
function childPid(marker: string): number {
  for (const task of readdirSync(`/proc/${process.pid}/task`)) {
    const kids = readFileSync(`/proc/${process.pid}/task/${task}/children`, 'utf8').trim().split(/\s+/).filter(Boolean);
    for (const k of kids) {
      const cmd = readFileSync(`/proc/${k}/cmdline`, 'utf8');
      if (cmd.includes(marker)) return Number(k);
    }
  }
  throw new Error(`no child process with '${marker}' in its command line`);
}

interface FailoverTimes {
  eventMs: number;
  servedMs: number;
}

async function lockstepFailover(root: string, round: number, how: 'kill' | 'freeze'): Promise<FailoverTimes> {
  const dir = join(root, `failover-${how}-${round}`);
  mkdirSync(dir, { recursive: true });
  const sup = newPair(dir, { heartbeatIntervalMs: PAIR_DEFAULTS.heartbeatIntervalMs, heartbeatTimeoutMs: PAIR_DEFAULTS.heartbeatTimeoutMs });
  let frozen = 0;
  let load: FioRun | null = null;
  const pids: number[] = [];
  try {
    await sup.start();
    pids.push(childPid(join(dir, 'primary.qmp')), childPid(join(dir, 'secondary.qmp')));
    for (const pid of pids) live.add(pid);
    const sock = join(dir, 'disk.sock');
    load = fio(`nbd+unix:///disk?socket=${sock}`, '4k', 16, 60);
    load.done.catch(() => {});
    await sleep(500);
    await sup.checkpoint();
    await sleep(300);
    const failedOver = new Promise<number>((resolve) => sup.once('failed-over', () => resolve(nowMs())));
    const t0 = nowMs();
    if (how === 'kill') sup.crashPrimary();
    else {
      frozen = childPid(join(dir, 'primary.qmp'));
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
    for (const pid of pids) live.delete(pid);
    rmSync(dir, { recursive: true, force: true });
  }
}

/** QEMU: kill the primary, fail over the secondary at once, export the recovered disk. */
async function qemuFailover(root: string, round: number): Promise<FailoverTimes> {
  const dir = join(root, `qemu-failover-${round}`);
  mkdirSync(dir, { recursive: true });
  const p = await qemuPairStart(dir);
  const pids = [p.primary.child.pid!, p.secondary.child.pid!];
  for (const pid of pids) live.add(pid);
  let load: FioRun | null = null;
  try {
    const sock = join(dir, 'disk.sock');
    load = fio(await qemuServe(p.primary, 'colo-disk0', sock), '4k', 16, 60);
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
    for (const pid of pids) live.delete(pid);
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

async function main(): Promise<void> {
  for (const tool of ['fio', ...(WITH_QEMU ? ['qemu-system-x86_64', 'qemu-img'] : [])]) {
    if (spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0) throw new Error(`${tool} is not installed`);
  }
  const root = mkdtempSync(join(tmpdir(), 'lockstep-bench-pair-'));
  const started = Date.now();
  const kinds: Kind[] = WITH_QEMU ? ['lockstep', 'qemu'] : ['lockstep'];
  const configs: Array<'off' | 'pair' | number> = ['off', 'pair', ...RATES];
  const md: string[] = [];
  const load = () => loadavg().map((x) => x.toFixed(2)).join(' ');
  console.log(`bench/pair: ${SIZE_MIB} MiB disk, ${SECONDS} s per run, fio nbd engine, random writes; every run on new images`);
  console.log(`${cpus().length} CPUs, load average at start ${load()}`);
  try {
    let seq = 0;
    const idle: number[][][] = [];
    for (const kind of kinds) idle.push(await within(idleCheckpoints(kind, root, 1500), 60_000, `${kind} idle checkpoints`));
    for (const w of WORKLOADS) {
      const res = new Map<string, RunResult>();
      const failed = new Map<string, string>();
      for (const c of configs) {
        for (const kind of kinds) {
          const what = `${w.bs} depth ${w.depth} ${configName(c)} ${kind}`;
          let r: RunResult;
          try {
            r = await within(measure(kind, c, w, root, seq++), SECONDS * 1000 + 60_000, what);
          } catch (e) {
            // QEMU's side of (c) rests on an emulated barrier: report its failure, go on
            if (kind !== 'qemu' || typeof c !== 'number') throw e;
            failed.set(`${kind}/${String(c)}`, errorMessage(e));
            killLive();
            console.log(`${what}: FAILED: ${errorMessage(e)}`);
            continue;
          }
          res.set(`${kind}/${String(c)}`, r);
          const cp = r.pauses.length
            ? `, ${r.pauses.length} checkpoints (${f1(r.achievedRate)}/s${r.skipped ? `, ${r.skipped} skipped` : ''}), pause median ${f2(quantile(r.pauses, 0.5))} ms p99 ${f2(quantile(r.pauses, 0.99))} ms`
            : '';
          console.log(`${w.bs} depth ${w.depth} ${configName(c)} ${kind}: ${f1(r.bwBytes / MiB)} MiB/s, ${r.iops.toFixed(0)} IOPS, clat p50 ${us(r.p50Us)} p99 ${us(r.p99Us)}, CPU ${r.cpuUsPerReq.toFixed(0)} us/request${cp}`);
        }
      }
      md.push('', `${w.bs} random writes, iodepth ${w.depth}:`, '');
      md.push(
        WITH_QEMU
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
        if (WITH_QEMU) {
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
      for (const rate of RATES) {
        const l = res.get(`lockstep/${rate}`)!;
        const q = res.get(`qemu/${rate}`) ?? null;
        md.push(
          `| ${rate}/s | ${f1(l.achievedRate)}/s | ${f2(quantile(l.pauses, 0.5))} ms | ${f2(quantile(l.pauses, 0.99))} ms | ${f2(quantile(l.pauses, 1))} ms | ` +
            `${f2(quantile(l.secondaryMs, 0.5))} ms | ${f2(quantile(l.pauses.map((x, i) => x - l.secondaryMs[i]!), 0.5))} ms | ${q ? `${f1(q.achievedRate)}/s${q.skipped ? ` (${q.skipped} skipped)` : ''}` : WITH_QEMU ? 'failed' : '-'} | ${q ? `${f2(quantile(q.pauses, 0.5))} ms` : '-'} | ${q ? `${f2(quantile(q.pauses, 0.99))} ms` : '-'} | ${q ? `${f2(quantile(q.secondaryMs, 0.5))} ms` : '-'} |`,
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
      for (const [k, msg] of failed) md.push('', `${k} failed: ${msg}`);
      const at40 = res.get('lockstep/40');
      if (at40) {
        const ratio = at40.bwBytes / res.get('lockstep/off')!.bwBytes;
        const p99 = quantile(at40.pauses, 0.99);
        md.push('', `aim at 40/s, ${w.bs}: throughput ${f2(ratio)}x unreplicated (aim >= 0.8: ${ratio >= 0.8 ? 'reached' : 'NOT reached'}); ` +
          `pause p99 ${f2(p99)} ms (aim < 5 ms: ${p99 < 5 ? 'reached' : 'NOT reached'})`);
      }
    }

    const budget = PAIR_DEFAULTS.heartbeatTimeoutMs + 1000;
    const fo: Record<string, FailoverTimes[]> = { kill: [], freeze: [], qemu: [] };
    for (let r = 0; r < ROUNDS; r++) {
      for (const how of ['kill', 'freeze'] as const) {
        const t = await within(lockstepFailover(root, r, how), 60_000, `lockstep failover (${how})`);
        fo[how]!.push(t);
        console.log(`failover ${how} round ${r + 1}: failed-over event ${f1(t.eventMs)} ms, first read ${f1(t.servedMs)} ms after the ${how}`);
      }
      if (WITH_QEMU) {
        const t = await within(qemuFailover(root, r), 60_000, 'QEMU failover');
        fo.qemu!.push(t);
        console.log(`failover QEMU round ${r + 1}: commit done ${f1(t.eventMs)} ms, first read ${f1(t.servedMs)} ms after the kill`);
      }
    }
    md.push('', `Failover (4 KiB load running; heartbeat interval ${PAIR_DEFAULTS.heartbeatIntervalMs} ms, timeout ${PAIR_DEFAULTS.heartbeatTimeoutMs} ms; aim: served within ${budget} ms; ${ROUNDS} rounds):`, '');
    md.push('| primary | to failed-over median | max | to first read median | max | aim |\n|---|---|---|---|---|---|');
    const foRow = (name: string, xs: FailoverTimes[], aim: boolean) => {
      const e = xs.map((x) => x.eventMs);
      const s = xs.map((x) => x.servedMs);
      const max = quantile(s, 1);
      md.push(`| ${name} | ${f1(quantile(e, 0.5))} ms | ${f1(quantile(e, 1))} ms | ${f1(quantile(s, 0.5))} ms | ${f1(max)} ms | ${aim ? (max <= budget ? 'reached' : 'NOT reached') : '-'} |`);
    };
    foRow('lockstep, killed (SIGKILL; the supervisor sees the exit)', fo.kill!, true);
    foRow('lockstep, frozen (SIGSTOP; only the heartbeat sees it)', fo.freeze!, true);
    if (WITH_QEMU) {
      foRow('QEMU 7.2, killed; the bench fails over at once (commit, then export)', fo.qemu!, false);
      const ratio = quantile(fo.qemu!.map((x) => x.servedMs), 0.5) / quantile(fo.kill!.map((x) => x.servedMs), 0.5);
      md.push('', `killed primary, time to first read, QEMU/lockstep median: ${f2(ratio)} (>1: lockstep faster)`);
    }
    console.log(md.join('\n'));
    console.log(`\ntotal ${((Date.now() - started) / 1000).toFixed(0)} s, load average at the end ${load()}`);
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
}

main().then(
  () => process.exit(0),
  (e: unknown) => {
    console.error(e);
    killLive();
    process.exit(1);
  },
);
