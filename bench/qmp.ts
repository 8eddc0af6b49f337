// QMP monitor round trips: lockstep daemon vs QEMU 7.2 (qemu-system-x86_64 -machine none),
// same client, same Unix-socket transport, same requests, in the same run.
//   node dist/bench/qmp.js [rounds]
// Rows: sequential query-status round trips; query-named-block-nodes with 50 null-co nodes;
// 8 clients each sending 1/8 of the round trips concurrently. Prints ops/s and the ratio
// lockstep/QEMU (above 1.0: lockstep is faster).

import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { QmpClient } from '../src/qmp/client.js';

const ROUNDS = Number(process.argv[2] ?? 5000);

async function waitFor(path: string): Promise<void> {
  for (let i = 0; i < 200 && !existsSync(path); i++) await new Promise((r) => setTimeout(r, 25));
}

interface Target {
  proc: ChildProcess;
  /** the socket of the i-th client (QEMU serves one client per monitor: it gets 9 monitors) */
  sock: (i: number) => string;
}

async function startLockstep(dir: string): Promise<Target> {
  const sock = join(dir, 'lockstep.sock');
  const proc = spawn(process.execPath, [resolve('bin/lockstep'), 'daemon', '--log-level', 'error', '--chardev', `socket,id=m,path=${sock},server=on,wait=off`, '--monitor', 'm'], {
    stdio: 'ignore',
  });
  await waitFor(sock);
  return { proc, sock: () => sock };
}

async function startQemu(dir: string): Promise<Target> {
  const sock = (i: number) => join(dir, `qemu${i}.sock`);
  const monitors = Array.from({ length: 9 }, (_, i) => ['-qmp', `unix:${sock(i)},server=on,wait=off`]).flat();
  const proc = spawn('qemu-system-x86_64', ['-machine', 'none', '-nodefaults', '-display', 'none', ...monitors], { stdio: 'ignore' });
  for (let i = 0; i < 9; i++) await waitFor(sock(i));
  return { proc, sock };
}

async function timeIt(fn: () => Promise<void>): Promise<number> {
  const t0 = process.hrtime.bigint();
  await fn();
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

async function rows(t: Target): Promise<number[]> {
  const c = await QmpClient.open({ type: 'unix', path: t.sock(0) });
  for (let i = 0; i < 50; i++) await c.execute('blockdev-add', { driver: 'null-co', 'node-name': `n${i}`, size: 1 << 20 });
  for (let i = 0; i < 200; i++) await c.execute('query-status'); // warm-up
  const seq = await timeIt(async () => {
    for (let i = 0; i < ROUNDS; i++) await c.execute('query-status');
  });
  const nodes = await timeIt(async () => {
    for (let i = 0; i < ROUNDS / 10; i++) await c.execute('query-named-block-nodes', { flat: true });
  });
  const clients = await Promise.all(Array.from({ length: 8 }, (_, i) => QmpClient.open({ type: 'unix', path: t.sock(i + 1) })));
  const par = await timeIt(async () => {
    await Promise.all(
      clients.map(async (k) => {
        for (let i = 0; i < ROUNDS / 8; i++) await k.execute('query-status');
      }),
    );
  });
  for (const k of clients) k.close();
  await c.execute('quit').catch(() => {});
  c.close();
  return [ROUNDS / seq, ROUNDS / 10 / nodes, ROUNDS / par];
}

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'lockstep-bench-qmp-'));
  try {
    const l = await startLockstep(dir);
    const ours = await rows(l);
    await new Promise((r) => l.proc.once('exit', r));
    const q = await startQemu(dir);
    const theirs = await rows(q);
    await new Promise((r) => q.proc.once('exit', r));
    const names = ['query-status round trips', 'query-named-block-nodes (50 nodes)', 'query-status, 8 clients'];
    console.log(`QMP over a Unix socket, ${ROUNDS} round trips per row`);
    console.log('row'.padEnd(38) + 'lockstep ops/s'.padStart(16) + 'QEMU ops/s'.padStart(14) + 'ratio'.padStart(8));
    names.forEach((n, i) => {
      console.log(n.padEnd(38) + ours[i]!.toFixed(0).padStart(16) + theirs[i]!.toFixed(0).padStart(14) + (ours[i]! / theirs[i]!).toFixed(2).padStart(8));
    });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

void main();
