// bench/checkpoint: the secondary's checkpoint (xen-colo-do-checkpoint) against the dirty
// data it discards, lockstep daemon beside qemu-system-x86_64 -machine none (QEMU 7.2) with
// the same graph in the same run. Overlays are opened as QEMU's docs open them: plain
// qcow2 over file, no cache.no-flush.
//
// Dirty data before each checkpoint, half and half (0 clusters: a checkpoint right after
// replication starts):
//   - forwarded writes: fio (nbd engine) writes 4 KiB into each of N/2 distinct 64 KiB
//     clusters of the secondary disk's export; each first write copies the cluster into
//     the hidden overlay;
//   - the secondary's own writes: qemu-io through HMP writes 4 KiB into each of N/2 other
//     clusters of the replication node, so each allocates a cluster of the active overlay.
// Then one checkpoint is timed (QMP round trip included), `--reps` times per figure, each
// on a new secondary.
//
// Run: npm run build && node dist/bench/checkpoint.js [--clusters 0,1000,16000] [--reps 3]

import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startLockstep, startQemu, type Proc } from '../test/helpers/processes.js';

type Kind = 'qemu' | 'lockstep';
const args = process.argv.slice(2);
const opt = (name: string, dflt: string): string => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1]! : dflt;
};
const COUNTS = opt('clusters', '0,1000,16000').split(',').map(Number);
const REPS = Number(opt('reps', '3'));
const MiB = 1024 * 1024;
const CLUSTER = 64 * 1024;
const SIZE_MIB = 2048; // room for 16,000 clusters in each half
let port = 23000 + (process.pid % 1000) * 4;

function sh(cmd: string, a: string[]): string {
  const r = spawnSync(cmd, a, { encoding: 'utf8', maxBuffer: 64 * MiB });
  if (r.status !== 0) throw new Error(`${cmd} ${a.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

async function secondary(kind: Kind, dir: string): Promise<{ proc: Proc; port: number }> {
  const sdisk = join(dir, `${kind}-sdisk.qcow2`);
  const active = join(dir, `${kind}-active.qcow2`);
  const hidden = join(dir, `${kind}-hidden.qcow2`);
  for (const f of [sdisk, active, hidden]) {
    rmSync(f, { force: true });
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', f, `${SIZE_MIB}M`]);
  }
  const p = port++;
  // the last run's monitor socket would be taken for the new process's (connection refused)
  rmSync(join(dir, `${kind}-sec.qmp`), { force: true });
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
  await proc.qmp.execute('xen-set-replication', { enable: true, primary: false });
  return { proc, port: p };
}

async function dirty(side: { proc: Proc; port: number }, clusters: number): Promise<void> {
  const forwarded = Math.floor(clusters / 2);
  const own = clusters - forwarded;
  if (forwarded > 0) {
    sh('fio', [
      '--name=dirty', '--ioengine=nbd', `--uri=nbd://127.0.0.1:${side.port}/parent0`, `--rw=write:${CLUSTER - 4096}`, '--bs=4k',
      `--number_ios=${forwarded}`, '--iodepth=16', `--size=${SIZE_MIB / 2}M`,
    ]);
  }
  // the second half of the disk: clusters neither the forwarded writes nor the hidden use
  const base = (SIZE_MIB / 2) * MiB;
  for (let i = 0; i < own; i++) {
    await side.proc.qmp.execute('human-monitor-command', { 'command-line': `qemu-io childs0 "write -P 0x5c ${base + i * CLUSTER} 4k"` });
  }
}

async function timeIt(fn: () => Promise<unknown>): Promise<number> {
  const t0 = process.hrtime.bigint();
  await fn();
  return Number(process.hrtime.bigint() - t0) / 1e6;
}

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'lockstep-bench-ckpt-'));
  const rows: string[] = [];
  try {
    for (const clusters of COUNTS) {
      const t: Record<Kind, number[]> = { lockstep: [], qemu: [] };
      const rtt: Record<Kind, number[]> = { lockstep: [], qemu: [] };
      let swapped = 0;
      for (let r = 0; r < REPS; r++) {
        for (const kind of ['lockstep', 'qemu'] as const) {
          const s = await secondary(kind, dir);
          try {
            await dirty(s, clusters);
            // a bare QMP round trip just before: what the machine's load alone costs
            rtt[kind].push(await timeIt(() => s.proc.qmp.execute('query-status')));
            const inodes = (): string => ['active', 'hidden'].map((o) => statSync(join(dir, `${kind}-${o}.qcow2`)).ino).join('/');
            const before = inodes();
            t[kind].push(await timeIt(() => s.proc.qmp.execute('xen-colo-do-checkpoint')));
            // lockstep's make_empty renames prepared empty images over both overlays
            if (kind === 'lockstep' && inodes().split('/').every((ino, i) => ino !== before.split('/')[i])) swapped++;
          } finally {
            await s.proc.quit();
          }
        }
      }
      const l = median(t.lockstep);
      const q = median(t.qemu);
      const line =
        `| ${clusters} | ${l.toFixed(2)} ms (${t.lockstep.map((x) => x.toFixed(1)).join(', ')}) | ${q.toFixed(2)} ms (${t.qemu.map((x) => x.toFixed(1)).join(', ')}) | ${(q / l).toFixed(2)} ` +
        `| ${median(rtt.lockstep).toFixed(2)} / ${median(rtt.qemu).toFixed(2)} ms | ${swapped}/${REPS} |`;
      rows.push(line);
      console.log(line);
    }
    console.log(
      '\n| dirty clusters | lockstep median (runs) | QEMU 7.2 median (runs) | ratio QEMU/lockstep (>1: lockstep faster) | bare QMP round trip lockstep / QEMU | lockstep overlays swapped |\n|---|---|---|---|---|---|',
    );
    for (const r of rows) console.log(r);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((e: unknown) => {
  console.error(e);
  process.exitCode = 1;
});
