// bench/replication: the secondary side of replication, lockstep against QEMU 7.2 in the
// same run, each as a separate process driven over QMP (QEMU: qemu-system-x86_64 -machine
// none with the same graph).
//
//   ingest      fio (nbd engine) writes to the secondary disk's NBD export: 4 KiB random
//               (depth 32) and 1 MiB sequential (depth 8), with replication running (every
//               first write to a cluster copies it into the hidden disk) and without.
//   checkpoint  time of xen-colo-do-checkpoint with 1,000 and 16,000 dirty clusters.
//   failover    time from the failover stop to the end of the commit of 64 and 128 MiB
//               (half copied into hidden by forwarded writes, half written into active).
//
// Run: npm run build && node dist/bench/replication.js [--seconds N] [--size-mib N]
//        [--only ingest|checkpoint|failover] [--commit-mib 64,128] [--reps N]

import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startLockstep, startQemu, type Proc } from '../test/helpers/processes.js';

type Kind = 'qemu' | 'lockstep';
const args = process.argv.slice(2);
const opt = (name: string, dflt: number): number => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? Number(args[i + 1]) : dflt;
};
const SECONDS = opt('seconds', 5);
const SIZE_MIB = opt('size-mib', 1024);
const ONLY = args.includes('--only') ? args[args.indexOf('--only') + 1] : undefined;
const COMMIT_MIB = (args.includes('--commit-mib') ? args[args.indexOf('--commit-mib') + 1]! : '64,128').split(',').map(Number);
const REPS = opt('reps', 1);
const MiB = 1024 * 1024;
let port = 21000 + (process.pid % 1000) * 4;

function sh(cmd: string, a: string[]): string {
  const r = spawnSync(cmd, a, { encoding: 'utf8', maxBuffer: 64 * MiB });
  if (r.status !== 0) throw new Error(`${cmd} ${a.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

interface Side {
  proc: Proc;
  port: number;
  active: string;
}

async function secondary(kind: Kind, dir: string, replicate: boolean): Promise<Side> {
  const sdisk = join(dir, `${kind}-sdisk.qcow2`);
  const active = join(dir, `${kind}-active.qcow2`);
  const hidden = join(dir, `${kind}-hidden.qcow2`);
  for (const f of [sdisk, active, hidden]) {
    rmSync(f, { force: true });
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', f, `${SIZE_MIB}M`]);
  }
  const p = port++;
  const proc =
    kind === 'qemu'
      ? await startQemu(dir, `${kind}-sec`, [
          '-drive', `if=none,id=parent0,driver=qcow2,file.filename=${sdisk}`,
          '-drive',
          `if=none,id=childs0,driver=replication,mode=secondary,top-id=childs0,file.driver=qcow2,file.file.filename=${active},` +
            `file.backing.driver=qcow2,file.backing.file.filename=${hidden},file.backing.backing=parent0`,
        ])
      : await startLockstep(dir, `${kind}-sec`, [
          '--blockdev', `driver=qcow2,node-name=parent0,file.driver=file,file.filename=${sdisk}`,
          '--blockdev',
          `driver=replication,node-name=childs0,mode=secondary,top-id=childs0,file.driver=qcow2,file.file.driver=file,file.file.filename=${active},` +
            `file.backing.driver=qcow2,file.backing.file.driver=file,file.backing.file.filename=${hidden},file.backing.backing=parent0`,
        ]);
  await proc.qmp.execute('nbd-server-start', { addr: { type: 'inet', data: { host: '127.0.0.1', port: String(p) } } });
  await proc.qmp.execute('nbd-server-add', { device: 'parent0', writable: true });
  if (replicate) await proc.qmp.execute('xen-set-replication', { enable: true, primary: false });
  return { proc, port: p, active };
}

function fio(uri: string, rw: string, bs: string, depth: number, seconds: number): number {
  const out = sh('fio', [
    '--name=ingest', '--ioengine=nbd', `--uri=${uri}`, `--rw=${rw}`, `--bs=${bs}`, `--iodepth=${depth}`,
    `--size=${SIZE_MIB}M`, '--time_based', `--runtime=${seconds}`, '--output-format=json', '--randrepeat=0',
  ]);
  const j = JSON.parse(out.slice(out.indexOf('{'))) as { jobs: Array<{ write: { bw_bytes: number; iops: number } }> };
  return j.jobs[0]!.write.bw_bytes;
}

async function dirty(side: Side, clusters: number): Promise<void> {
  // one 4 KiB write in each of `clusters` distinct 64 KiB clusters, through the export
  const step = Math.floor((SIZE_MIB * MiB) / (64 * 1024) / clusters) * 64 * 1024;
  sh('fio', [
    '--name=dirty', '--ioengine=nbd', `--uri=nbd://127.0.0.1:${side.port}/parent0`, `--rw=write:${step - 4096}`, '--bs=4k',
    `--number_ios=${clusters}`, '--iodepth=16', `--size=${SIZE_MIB}M`,
  ]);
}

async function timeIt(fn: () => Promise<unknown>): Promise<number> {
  const t0 = process.hrtime.bigint();
  await fn();
  return Number(process.hrtime.bigint() - t0) / 1e6;
}

async function waitCommit(side: Side): Promise<void> {
  for (;;) {
    const nodes = (await side.proc.qmp.execute('query-named-block-nodes')) as Array<{ file: string }>;
    if (!nodes.some((n) => n.file === side.active)) return;
    await new Promise((r) => setTimeout(r, 2));
  }
}

function mbs(bytes: number): string {
  return `${(bytes / MiB).toFixed(1)} MiB/s`;
}

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'lockstep-bench-repl-'));
  const rows: string[] = [];
  const row = (name: string, l: number, q: number, unit: (x: number) => string, higherIsBetter: boolean) => {
    const ratio = higherIsBetter ? l / q : q / l;
    rows.push(`| ${name} | ${unit(l)} | ${unit(q)} | ${ratio.toFixed(2)} |`);
    console.log(`${name}: lockstep ${unit(l)}, QEMU ${unit(q)}, ratio ${ratio.toFixed(2)}`);
  };
  try {
    for (const [rw, bs, depth] of ONLY && ONLY !== 'ingest' ? [] : ([['randwrite', '4k', 32], ['write', '1M', 8]] as const)) {
      const res: Record<string, number> = {};
      for (const kind of ['lockstep', 'qemu'] as const) {
        for (const replicate of [false, true]) {
          const s = await secondary(kind, dir, replicate);
          res[`${kind}-${replicate}`] = fio(`nbd://127.0.0.1:${s.port}/parent0`, rw, bs, depth, SECONDS);
          await s.proc.quit();
        }
      }
      row(`ingest ${bs} ${rw} depth ${depth}, replicating`, res['lockstep-true']!, res['qemu-true']!, mbs, true);
      row(`ingest ${bs} ${rw} depth ${depth}, not replicating`, res['lockstep-false']!, res['qemu-false']!, mbs, true);
      console.log(`  lockstep replicating/plain ${(res['lockstep-true']! / res['lockstep-false']!).toFixed(2)}, QEMU ${(res['qemu-true']! / res['qemu-false']!).toFixed(2)}`);
    }
    for (const clusters of ONLY && ONLY !== 'checkpoint' ? [] : [1000, 16000]) {
      const t: Record<string, number> = {};
      for (const kind of ['lockstep', 'qemu'] as const) {
        const s = await secondary(kind, dir, true);
        await dirty(s, clusters);
        t[kind] = await timeIt(() => s.proc.qmp.execute('xen-colo-do-checkpoint'));
        await s.proc.quit();
      }
      row(`checkpoint, ${clusters} dirty clusters (QMP round trip included)`, t.lockstep!, t.qemu!, (x) => `${x.toFixed(2)} ms`, false);
    }
    for (const mib of ONLY && ONLY !== 'failover' ? [] : COMMIT_MIB) {
      const t: Record<string, number[]> = { lockstep: [], qemu: [] };
      const half = mib / 2;
      for (let r = 0; r < REPS; r++) {
        for (const kind of ['lockstep', 'qemu'] as const) {
          const s = await secondary(kind, dir, true);
          sh('fio', ['--name=fill', '--ioengine=nbd', `--uri=nbd://127.0.0.1:${s.port}/parent0`, '--rw=write', '--bs=1M', '--iodepth=8', `--size=${half}M`]);
          await s.proc.io('childs0', `write -P 0x33 ${half}M ${half}M`);
          t[kind]!.push(
            await timeIt(async () => {
              await s.proc.qmp.execute('xen-set-replication', { enable: false, primary: false, failover: true });
              await waitCommit(s);
            }),
          );
          await s.proc.quit();
        }
      }
      const med = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
      row(
        `failover commit of ${mib} MiB (${half} MiB hidden + ${half} MiB active), median of ${REPS} (${t.lockstep!.map((x) => x.toFixed(0)).join('/')} vs ${t.qemu!.map((x) => x.toFixed(0)).join('/')})`,
        med(t.lockstep!),
        med(t.qemu!),
        (x) => `${x.toFixed(1)} ms`,
        false,
      );
    }
    console.log('\n| figure | lockstep | QEMU 7.2 | ratio (>1: lockstep better) |\n|---|---|---|---|');
    for (const r of rows) console.log(r);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((e: unknown) => {
  console.error(e);
  process.exitCode = 1;
});
