// Helpers of bench/pair: processes started by the bench, fio runs, timing and /proc figures.

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { NbdClient } from '../../src/nbd/client/client.js';
import type { PairSupervisor } from '../../src/pair/supervisor.js';

export const MiB = 1024 * 1024;

/** What every step of the bench needs: the disk size and the processes it has running. */
export interface BenchContext {
  sizeMiB: number;
  /** every server and fio process this bench started (directly or through a supervisor), until stopped */
  live: Set<number>;
}

/** Ends, by pid, whatever this bench started that is still running. */
export function killLive(ctx: BenchContext): void {
  for (const pid of ctx.live) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
  ctx.live.clear();
}

export function sh(cmd: string, a: string[]): string {
  const r = spawnSync(cmd, a, { encoding: 'utf8', maxBuffer: 64 * MiB });
  if (r.status !== 0) throw new Error(`${cmd} ${a.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

/** Rejects when `p` has not settled within `ms`: a stuck step must not hang the bench. */
export function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not finish within ${ms} ms`)), ms);
  });
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
export const nowMs = () => Number(process.hrtime.bigint()) / 1e6;

export function quantile(xs: number[], q: number): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1))]!;
}

export interface FioResult {
  bwBytes: number;
  iops: number;
  p50Us: number;
  p99Us: number;
  ios: number;
}

export interface FioRun {
  child: ChildProcess;
  done: Promise<FioResult>;
}

/**
 * Starts fio's nbd engine on `uri`; resolves with its figures when it ends. The writes go to
 * the first `regionKiB` of the disk (all of it by default); `extra` adds fio options.
 */
export function fio(ctx: BenchContext, uri: string, bs: string, depth: number, seconds: number, regionKiB = ctx.sizeMiB * 1024, extra: string[] = []): FioRun {
  const child = spawn('fio', [
    '--name=load', '--ioengine=nbd', `--uri=${uri}`, '--rw=randwrite', `--bs=${bs}`, `--iodepth=${depth}`,
    `--size=${regionKiB}k`, '--time_based', `--runtime=${seconds}`, '--output-format=json', '--randrepeat=0',
    // threads, not a forked job process: SIGSTOP on fio must freeze the load itself
    '--thread', ...extra,
  ], { stdio: ['ignore', 'pipe', 'pipe'] });
  ctx.live.add(child.pid!);
  child.once('exit', () => ctx.live.delete(child.pid!));
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

/**
 * Reads 4 KiB from the served disk until it works; resolves with the time it first did.
 * Attempts overlap (a new one every 5 ms): a connection to a frozen primary hangs until its
 * timeout, and must not hide the moment the secondary starts serving.
 */
export async function firstRead(sock: string, deadlineMs: number): Promise<number> {
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


/** User + system CPU seconds of a process so far (Linux /proc). */
export function cpuSeconds(pid: number, clockTicks: number): number {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = f.slice(f.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / clockTicks;
}

/** The two daemons' pids, [primary, secondary], of a pair the bench started. */
export function daemonPids(sup: PairSupervisor): [number, number] {
  const { primary, secondary } = sup.pids();
  if (primary === undefined || secondary === undefined) throw new Error('the pair has no daemon processes of its own');
  return [primary, secondary];
}
