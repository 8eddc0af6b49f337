// bench/pair-flush: what output commit (issue 16) costs a client that flushes. fio, 4 KiB
// random writes at depth 1, each followed by a flush, in two loads:
//   fsync        fio's nbd engine with fsync=1: every flush is an NBD_CMD_FLUSH (the engine
//                has no datasync: fdatasync=1 fails there on every target);
//   ext4-fdatasync  fio's psync engine with fdatasync=1 on a file in ext4 (default mkfs) on
//                the served disk seen as a block device (nbdfuse + a loop device,
//                test/helpers/guest.ts): what a database's fdatasync costs through a
//                filesystem (the kernel turns it into a cache flush of the loop device, an
//                fsync of the FUSE file, an NBD_CMD_FLUSH);
// flush latency median and p99 (fio's sync latency) and write throughput, on
//   (a) the lockstep pair with flush commit (the default): each flush waits for a checkpoint
//       it starts itself; survives failover;
//   (b) the lockstep pair with --flush-commit off: a flush completes on the primary's disk;
//       lost at failover if after the last checkpoint;
//   (c) QEMU 7.2's pair, same graph, in the same run: likewise lost at failover.
// Checkpoint interval 1 s in (a) and (b) (the pair's default); none in (c).
//
// Run: npm run build && node dist/bench/pair-flush.js [--seconds N] [--size-mib N] [--no-qemu]
//        [--modes fsync,ext4-fdatasync]   (ext4-fdatasync needs root, /dev/fuse, loop devices,
//        nbdfuse and e2fsprogs)

import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { PairSupervisor, PAIR_DEFAULTS } from '../src/pair/supervisor.js';
import { MiB, killLive, type BenchContext } from './pair/util.js';
import { qemuPair, track, type Target } from './pair/targets.js';
import { GuestDisk, canMakeGuest, runAsync } from '../test/helpers/guest.js';

type Mode = 'fsync' | 'ext4-fdatasync';

interface SyncResult {
  iops: number;
  syncP50Us: number;
  syncP99Us: number;
  syncs: number;
}

function runFio(ctx: BenchContext, args: string[], what: string): Promise<SyncResult> {
  const child = spawn('fio', [...args, '--output-format=json'], { stdio: ['ignore', 'pipe', 'pipe'] });
  ctx.live.add(child.pid!);
  let out = '';
  let err = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  return new Promise((resolve, reject) => {
    child.once('exit', (code) => {
      ctx.live.delete(child.pid!);
      if (code !== 0) return reject(new Error(`fio ${what} ended with ${code}: ${(err + out).trim().slice(-600)}`));
      const j = JSON.parse(out.slice(out.indexOf('{'))) as {
        jobs: Array<{ write: { iops: number }; sync: { total_ios: number; lat_ns: { percentile?: Record<string, number> } } }>;
      };
      const job = j.jobs[0]!;
      const pct = job.sync.lat_ns.percentile ?? {};
      resolve({ iops: job.write.iops, syncP50Us: (pct['50.000000'] ?? NaN) / 1000, syncP99Us: (pct['99.000000'] ?? NaN) / 1000, syncs: job.sync.total_ios });
    });
  });
}

const common = (seconds: number) => ['--rw=randwrite', '--bs=4k', '--iodepth=1', '--time_based', `--runtime=${seconds}`, '--randrepeat=0'];

/** fio's nbd engine straight on the served disk, a flush after every write. */
function fioNbd(ctx: BenchContext, uri: string, seconds: number): Promise<SyncResult> {
  return runFio(ctx, ['--name=flush', '--ioengine=nbd', `--uri=${uri}`, '--fsync=1', `--size=${ctx.sizeMiB}M`, ...common(seconds)], 'fsync');
}

/**
 * ext4 (default mkfs) on the served disk through nbdfuse + a loop device, fio's psync engine
 * on a file of half the disk with fdatasync after every write. The file is laid out and
 * synced first, so the timed run's first fdatasync does not write the layout back.
 */
async function fioExt4(ctx: BenchContext, uri: string, dir: string, seconds: number): Promise<SyncResult> {
  const g = await GuestDisk.attach(join(dir, 'guest'), uri);
  try {
    await g.mkfs();
    const mnt = await g.mount();
    // fallocate=none: the layout writes the file, so its extents are written ones and an
    // fdatasync of an overwrite has no metadata to commit (as a database's page file)
    const file = ['--name=flush', '--ioengine=psync', `--filename=${join(mnt, 'fio.dat')}`, `--size=${Math.floor(ctx.sizeMiB / 2)}M`, '--fallocate=none'];
    await runFio(ctx, [...file, '--create_only=1', '--rw=write', '--bs=1M'], 'layout');
    await runAsync('sync', ['-f', join(mnt, 'fio.dat')], { timeoutMs: 300_000 });
    const r = await runFio(ctx, [...file, '--fdatasync=1', ...common(seconds)], 'ext4-fdatasync');
    await g.umount();
    return r;
  } finally {
    await g.detach();
  }
}

async function lockstepPair(ctx: BenchContext, dir: string, flushCommit: boolean): Promise<{ t: Target; sup: PairSupervisor }> {
  const sup = new PairSupervisor({
    dataDir: dir,
    size: ctx.sizeMiB * MiB,
    checkpointIntervalMs: PAIR_DEFAULTS.checkpointIntervalMs,
    heartbeatIntervalMs: PAIR_DEFAULTS.heartbeatIntervalMs,
    heartbeatTimeoutMs: PAIR_DEFAULTS.heartbeatTimeoutMs,
    failover: 'auto',
    flushCommit,
    nbdSocket: join(dir, 'disk.sock'),
    log: (level, msg) => {
      if (level === 'error') console.error(`  [pair] ${msg}`);
    },
  });
  await sup.start();
  const pids = Object.values(sup.pids());
  return { t: { uri: `nbd+unix:///disk?socket=${join(dir, 'disk.sock')}`, pids, stop: () => sup.stop() }, sup };
}

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  const num = (name: string, d: number) => {
    const i = args.indexOf(name);
    return i >= 0 ? Number(args[i + 1]) : d;
  };
  const seconds = num('--seconds', 10);
  const ctx: BenchContext = { sizeMiB: num('--size-mib', 256), live: new Set() };
  const withQemu = !args.includes('--no-qemu');
  const mi = args.indexOf('--modes');
  const modes = (mi >= 0 ? args[mi + 1]! : 'fsync,ext4-fdatasync').split(',') as Mode[];
  for (const m of modes) if (m !== 'fsync' && m !== 'ext4-fdatasync') throw new Error(`unknown mode '${m}' (known: fsync, ext4-fdatasync)`);
  if (modes.includes('ext4-fdatasync') && !canMakeGuest()) throw new Error('ext4-fdatasync needs root, /dev/fuse, loop devices, nbdfuse and e2fsprogs');
  const root = mkdtempSync(join(tmpdir(), 'lockstep-bench-flush-'));
  const cleanup = () => {
    killLive(ctx);
    rmSync(root, { recursive: true, force: true });
  };
  process.once('SIGINT', () => (cleanup(), process.exit(130)));
  console.log(`bench/pair-flush: ${cpus().length} CPUs, load ${loadavg().map((x) => x.toFixed(1)).join(' ')}, ${seconds} s per run, disk ${ctx.sizeMiB} MiB`);
  const rows: string[] = [];
  const label: Record<Mode, string> = { fsync: 'fsync=1 (nbd engine)', 'ext4-fdatasync': 'fdatasync=1 on ext4 (psync, nbdfuse + loop)' };
  const results: Record<string, SyncResult> = {};
  try {
    for (const mode of modes) {
      const configs: Array<[string, (dir: string) => Promise<Target>, string]> = [
        ['lockstep, flush commit', async (d) => track(ctx, (await lockstepPair(ctx, d, true)).t), 'yes'],
        ['lockstep, --flush-commit off', async (d) => track(ctx, (await lockstepPair(ctx, d, false)).t), 'no (after the last checkpoint)'],
        ...(withQemu ? [['QEMU 7.2 pair', (d: string) => qemuPair(ctx, d).then((t) => track(ctx, t)), 'no (no checkpoint covers it)'] as [string, (dir: string) => Promise<Target>, string]] : []),
      ];
      for (const [name, make, survives] of configs) {
        const dir = join(root, `${mode}-${name.replace(/\W+/g, '-')}`);
        mkdirSync(dir);
        const t = await make(dir);
        try {
          const r = mode === 'fsync' ? await fioNbd(ctx, t.uri, seconds) : await fioExt4(ctx, t.uri, dir, seconds);
          results[`${mode}/${name}`] = r;
          rows.push(`| ${label[mode]} | ${name} | ${(r.syncP50Us / 1000).toFixed(2)} | ${(r.syncP99Us / 1000).toFixed(2)} | ${r.iops.toFixed(0)} | ${survives} |`);
          console.log(rows[rows.length - 1]);
        } catch (e) {
          rows.push(`| ${label[mode]} | ${name} | failed: ${String((e as Error).message).split('\n').join(' ').slice(0, 200)} | | | ${survives} |`);
          console.log(rows[rows.length - 1]);
        } finally {
          await t.stop();
        }
      }
    }
  } finally {
    cleanup();
  }
  console.log('\n| load | target | flush median ms | flush p99 ms | writes/s | acknowledged flush survives failover |');
  console.log('|---|---|---|---|---|---|');
  for (const r of rows) console.log(r);
  for (const mode of modes) {
    const a = results[`${mode}/lockstep, flush commit`];
    const b = results[`${mode}/lockstep, --flush-commit off`];
    const q = results[`${mode}/QEMU 7.2 pair`];
    if (a && b) console.log(`${mode}: writes/s with flush commit / without: ${(a.iops / b.iops).toFixed(3)}`);
    if (a && q) console.log(`${mode}: writes/s lockstep (flush commit) / QEMU: ${(a.iops / q.iops).toFixed(3)}; without flush commit / QEMU: ${b ? (b.iops / q.iops).toFixed(3) : '-'}`);
  }
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
