// bench/reprotect: what re-protecting a pair costs after its secondary was lost, against a
// full copy of the disk in the same run (issue 13's bench).
//
//   disk     --size (default 16 GiB) of real data: a patterned qcow2 written with qemu-io
//            (every 64 MiB its own byte), copied to the secondary, both records in step,
//            so the pair starts with nothing to copy
//   load     the secondary daemon SIGKILLed (stage degraded), then --seconds (default 30) of
//            fio 4 KiB random writes, depth 16, confined to the first --region (1 GiB)
//   R        `lockstep pair reprotect`: the secondary restarted and resynced live from the
//            two change records until protected (no write load during it)
//   F        lockstep's full copy: x-blockdev-resync of the whole disk on the primary's
//            daemon onto a fresh qcow2 (what a re-protection without records copies)
//   Q        QEMU's: qemu-img convert of the served disk (over NBD) to a fresh qcow2, the
//            whole-disk copy COLO's re-protection (drive-mirror of the disk) amounts to
//   ratios   R/F and R/Q (time), and the bytes R copied over the disk's size (what its jobs
//            wrote: the records' union with its gaps of at most MERGE_GAP filled)
//
// Run: npm run build && nice -n 10 node dist/bench/reprotect.js [--size 2G] [--seconds 30]
//      [--region 1G] [--dir DIR] [--rate 0]   (DIR: where the images go; default the system
//      temp dir; it needs about three times --size free)

import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { PairSupervisor, PAIR_DEFAULTS } from '../src/pair/supervisor.js';
import { inStep, justCreated, newId } from '../src/pair/generations.js';
import { writeFileDurably } from '../src/pair/meta-store.js';
import { parseSize } from '../src/block/options.js';
import { resync } from '../src/pair/sync.js';
import { PRIMARY_LOG } from '../src/pair/setup.js';
import { MiB, fio, killLive, nowMs, sh, within, type BenchContext } from './pair/util.js';

interface Options {
  size: number;
  seconds: number;
  region: number;
  dir: string;
  rate: number;
}

function parseOptions(args: string[]): Options {
  const known = new Set(['--size', '--seconds', '--region', '--dir', '--rate']);
  for (const a of args) if (a.startsWith('--') && !known.has(a)) throw new Error(`unknown option '${a}' (known: ${[...known].join(', ')})`);
  const opt = (name: string): string | undefined => {
    const i = args.indexOf(`--${name}`);
    if (i < 0) return undefined;
    const v = args[i + 1];
    if (v === undefined || v.startsWith('--')) throw new Error(`--${name} needs a value`);
    return v;
  };
  const size = (name: string, dflt: number): number => {
    const v = opt(name);
    if (v === undefined) return dflt;
    const n = parseSize(v);
    if (n === null) throw new Error(`--${name}: '${v}' is not a size (such as 2G, 512M)`);
    return n;
  };
  const seconds = Number(opt('seconds') ?? 30);
  if (!Number.isFinite(seconds) || seconds <= 0) throw new Error('--seconds must be a positive number');
  const o = { size: size('size', 16 * 1024 * MiB), seconds, region: size('region', 1024 * MiB), dir: opt('dir') ?? tmpdir(), rate: size('rate', 0) };
  if (o.size % (64 * MiB) !== 0) throw new Error('--size must be a multiple of 64 MiB');
  if (o.region > o.size) throw new Error('--region must not exceed --size');
  return o;
}

const GiB = 1024 * MiB;
const fmt = (b: number): string => (b >= GiB ? `${(b / GiB).toFixed(2)} GiB` : `${(b / MiB).toFixed(1)} MiB`);
const load = (): string => loadavg().map((x) => x.toFixed(1)).join(' ');

/** Both disks of a pair, in step, full of patterned data: the pair starts copying nothing. */
function fillDisks(dir: string, size: number): void {
  const p = join(dir, 'primary.qcow2');
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', p, String(size)]);
  const cmds: string[] = [];
  for (let off = 0, i = 0; off < size; off += 64 * MiB, i++) cmds.push('-c', `write -P ${1 + (i % 254)} ${off} ${64 * MiB}`);
  sh('qemu-io', ['-f', 'qcow2', p, ...cmds]);
  sh('cp', [p, join(dir, 'secondary.qcow2')]);
  const [a, b] = inStep(justCreated('primary.qcow2', size, 'primary'), justCreated('secondary.qcow2', size, 'secondary'), newId());
  writeFileDurably(join(dir, 'primary.qcow2.meta.json'), JSON.stringify(a, null, 1) + '\n');
  writeFileDurably(join(dir, 'secondary.qcow2.meta.json'), JSON.stringify(b, null, 1) + '\n');
}

async function main(): Promise<void> {
  const o = parseOptions(process.argv.slice(2));
  const ctx: BenchContext = { sizeMiB: o.size / MiB, live: new Set() };
  const dir = mkdtempSync(join(o.dir, 'bench-reprotect-'));
  let sup: PairSupervisor | null = null;
  let copySeconds = 0;
  const cleanup = (): void => {
    killLive(ctx);
    rmSync(dir, { recursive: true, force: true });
  };
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    process.once(sig, () => {
      for (const pid of Object.values(sup?.pids() ?? {})) ctx.live.add(pid);
      cleanup();
      process.exit(sig === 'SIGINT' ? 130 : 143);
    });
  }
  console.log(`bench/reprotect: ${fmt(o.size)} disk, ${o.seconds} s of fio 4 KiB randwrite depth 16 in the first ${fmt(o.region)}, in ${o.dir}`);
  console.log(`machine: ${cpus().length} CPUs, load average at start ${load()}`);
  try {
    let t = nowMs();
    fillDisks(dir, o.size);
    console.log(`  filled both disks in ${((nowMs() - t) / 1000).toFixed(1)} s (${fmt(statSync(join(dir, 'primary.qcow2')).size)} file each)`);
    const sock = join(dir, 'disk.sock');
    const s = new PairSupervisor({
      dataDir: dir,
      size: o.size,
      checkpointIntervalMs: PAIR_DEFAULTS.checkpointIntervalMs,
      heartbeatIntervalMs: PAIR_DEFAULTS.heartbeatIntervalMs,
      // a loaded machine must not fail the primary over in the middle of the measurement
      heartbeatTimeoutMs: 5000,
      failover: 'manual',
      nbdSocket: sock,
      // brought back by hand, when the load is over
      reprotectBackoffMs: 3_600_000,
      ...(o.rate > 0 ? { resyncRate: o.rate } : {}),
      log: (level, msg, fields) => {
        if (level === 'error') console.error(`  [pair] ${msg}`);
        // the copy's own time, without the daemon's restart and the graph's set-up
        if (msg === 'resync pass done') copySeconds += Number(fields?.seconds ?? 0);
      },
    });
    sup = s;
    await s.start();
    if (s.lastResync && s.lastResync.bytes > 0) throw new Error(`the pair copied ${s.lastResync.bytes} bytes at start: the disks were not in step`);
    for (const pid of Object.values(s.pids())) ctx.live.add(pid);
    const uri = `nbd+unix:///disk?socket=${sock}`;
    const degraded = new Promise((r) => s.once('degraded', r));
    s.secondary!.child!.kill('SIGKILL');
    await within(degraded, 30_000, 'the degraded stage');
    console.log(`  secondary killed: degraded; ${o.seconds} s of writes on the primary alone`);
    const w = await fio(ctx, uri, '4k', 16, o.seconds, o.region / 1024).done;
    console.log(`  load: ${w.iops.toFixed(0)} IOPS, ${w.ios} writes; load average ${load()}`);

    t = nowMs();
    await within(s.reprotect(), 3_600_000, 're-protection');
    const rMs = nowMs() - t;
    const r = s.lastReprotect!;
    const copied = r.passes.reduce((a, x) => a + x.bytes, 0);
    const union = r.union.reduce((a, x) => a + x.length, 0);
    console.log(`  R re-protect: ${(rMs / 1000).toFixed(2)} s (the copy passes ${copySeconds.toFixed(2)} s, the barrier ${r.pauseMs} ms), copied ${fmt(copied)} (records' union ${fmt(union)}, ${r.passes.length} passes), load average ${load()}`);
    await s.checkpoint();

    // F: lockstep's copy of the whole disk, on the primary's daemon, onto a fresh image
    const full = join(dir, 'full.qcow2');
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', full, String(o.size)]);
    const p = s.primary!;
    await p.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'bench-full', file: { driver: 'file', filename: full } });
    t = nowMs();
    const f = await resync(p.qmp, () => {}, undefined, PRIMARY_LOG, 'bench-full', [{ offset: 0, length: o.size }], false, 'resync');
    const fMs = nowMs() - t;
    await p.qmp.execute('blockdev-del', { 'node-name': 'bench-full' });
    rmSync(full, { force: true });
    console.log(`  F lockstep full copy (x-blockdev-resync): ${(fMs / 1000).toFixed(2)} s, ${fmt(f.dataBytes)} data, load average ${load()}`);

    // Q: QEMU's whole-disk copy of the served disk
    const q = join(dir, 'qemu.qcow2');
    t = nowMs();
    sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', uri, q]);
    const qMs = nowMs() - t;
    rmSync(q, { force: true });
    console.log(`  Q qemu-img convert of the disk: ${(qMs / 1000).toFixed(2)} s, load average ${load()}`);

    console.log(`\n| step | seconds | bytes copied |\n|---|---|---|`);
    console.log(`| R lockstep pair reprotect (whole) | ${(rMs / 1000).toFixed(2)} | ${fmt(copied)} |`);
    console.log(`| R' its copy passes only | ${copySeconds.toFixed(2)} | ${fmt(copied)} |`);
    console.log(`| F lockstep full copy | ${(fMs / 1000).toFixed(2)} | ${fmt(o.size)} |`);
    console.log(`| Q qemu-img convert | ${(qMs / 1000).toFixed(2)} | ${fmt(o.size)} |`);
    console.log(`\nre-protect / lockstep full copy: ${(rMs / fMs).toFixed(3)}x;  re-protect / qemu-img convert: ${(rMs / qMs).toFixed(3)}x;  copied / disk: ${(copied / o.size).toFixed(4)}`);
    console.log(`copy passes / lockstep full copy: ${((1000 * copySeconds) / fMs).toFixed(3)}x;  copy passes / qemu-img convert: ${((1000 * copySeconds) / qMs).toFixed(3)}x`);
    await s.stop();
    sup = null;
  } finally {
    if (sup) await sup.stop().catch(() => {});
    cleanup();
  }
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
