// blockdev-create over QMP: lockstep daemon vs qemu-storage-daemon 7.2, same client, same
// Unix-socket transport, same requests, in the same run. Each row times the supervisor's
// conversation from the first request to the last job's `concluded` event:
//   qcow2 64G:        file size 0, blockdev-add, qcow2 64 GiB, job-dismiss x2, blockdev-del
//                     (repeated --reps times: the latency of creating an overlay)
//   qcow2 100G meta:  the same with preallocation=metadata (every L2 table and refcount)
//   file 256M full:   a raw file with preallocation=full (zeroes written)
// Prints ms per run for each side and the ratio QEMU/lockstep (above 1.0: lockstep is faster).
//   node dist/bench/create.js [--reps N]

import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { QmpClient } from '../src/qmp/client.js';

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;
const repsArg = process.argv.indexOf('--reps');
const REPS = repsArg > 0 ? Number(process.argv[repsArg + 1]) : 20;

interface Side {
  name: string;
  proc: ChildProcess;
  c: QmpClient;
}

async function waitFor(path: string): Promise<void> {
  for (let i = 0; i < 400 && !existsSync(path); i++) await new Promise((r) => setTimeout(r, 25));
}

async function start(name: 'lockstep' | 'qemu', dir: string): Promise<Side> {
  const sock = join(dir, `${name}.sock`);
  const monitor = ['--chardev', `socket,id=m,path=${sock},server=on,wait=off`, '--monitor', 'chardev=m'];
  const proc =
    name === 'lockstep'
      ? spawn(process.execPath, [resolve('bin/lockstep'), 'daemon', '--log-level', 'error', ...monitor], { stdio: 'ignore' })
      : spawn('qemu-storage-daemon', monitor, { stdio: 'ignore' });
  await waitFor(sock);
  const c = await QmpClient.open({ type: 'unix', path: sock });
  return { name, proc, c };
}

async function createJob(c: QmpClient, id: string, options: Record<string, unknown>): Promise<void> {
  const done = c.waitEvent('JOB_STATUS_CHANGE', (d) => d.id === id && d.status === 'concluded', 600_000);
  await c.execute('blockdev-create', { 'job-id': id, options });
  await done;
  const jobs = (await c.execute('query-jobs')) as Array<{ id: string; error?: string }>;
  const err = jobs.find((j) => j.id === id)?.error;
  if (err) throw new Error(`${id}: ${err}`);
  await c.execute('job-dismiss', { id });
  c.events.length = 0;
}

async function qcow2(c: QmpClient, file: string, size: number, prealloc: 'off' | 'metadata'): Promise<void> {
  await createJob(c, 'c1', { driver: 'file', filename: file, size: 0 });
  await c.execute('blockdev-add', { driver: 'file', 'node-name': 'f1', filename: file });
  await createJob(c, 'c2', { driver: 'qcow2', file: 'f1', size, preallocation: prealloc });
  await c.execute('blockdev-del', { 'node-name': 'f1' });
}

async function timeRuns(reps: number, fn: (i: number) => Promise<void>): Promise<number> {
  await fn(-1); // warm-up
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < reps; i++) await fn(i);
  return Number(process.hrtime.bigint() - t0) / 1e6 / reps;
}

async function rows(s: Side, dir: string): Promise<number[]> {
  const f = (i: number) => join(dir, `${s.name}-${i}.img`);
  return [
    await timeRuns(REPS, (i) => qcow2(s.c, f(i), 64 * GiB, 'off')),
    await timeRuns(Math.max(1, Math.floor(REPS / 10)), (i) => qcow2(s.c, f(i), 100 * GiB, 'metadata')),
    await timeRuns(Math.max(1, Math.floor(REPS / 10)), (i) => createJob(s.c, 'c3', { driver: 'file', filename: f(i), size: 256 * MiB, preallocation: 'full' })),
  ];
}

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'lockstep-bench-create-'));
  const labels = ['qcow2 64G (file+add+qcow2+del)', 'qcow2 100G metadata', 'file 256M full'];
  try {
    const results: Record<string, number[]> = {};
    for (const name of (process.env.BENCH_QEMU_FIRST ? ['qemu', 'lockstep'] : ['lockstep', 'qemu']) as Array<'lockstep' | 'qemu'>) {
      // one folder per side, removed after it: the images do not pile up
      const sdir = join(dir, name);
      mkdirSync(sdir);
      const s = await start(name, sdir);
      try {
        results[name] = await rows(s, sdir);
      } finally {
        await s.c.execute('quit').catch(() => {});
        s.c.close();
        await new Promise((r) => (s.proc.exitCode !== null ? r(null) : s.proc.once('exit', r)));
        rmSync(sdir, { recursive: true, force: true });
      }
    }
    console.log(`blockdev-create, ${REPS} reps (ms per run; ratio = QEMU / lockstep, above 1.0: lockstep is faster)`);
    labels.forEach((l, i) => {
      const ours = results['lockstep']![i]!;
      const theirs = results['qemu']![i]!;
      console.log(`${l.padEnd(34)} lockstep ${ours.toFixed(2).padStart(9)}  qemu ${theirs.toFixed(2).padStart(9)}  ratio ${(theirs / ours).toFixed(2)}`);
    });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
