// The served disks bench/pair measures: lockstep (one daemon, or a pair under a
// PairSupervisor) and QEMU 7.2 with the same graph (qemu-system-x86_64 -machine none).

import type { ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { PairSupervisor, PAIR_DEFAULTS, type PairOptions } from '../../src/pair/supervisor.js';
import { createQcow2 } from '../../src/block/drivers/qcow2/create.js';
import { startLockstep, startQemu, type Proc } from '../../test/helpers/processes.js';
import { MiB, daemonPids, nowMs, sh, sleep, type BenchContext } from './util.js';

export type Kind = 'lockstep' | 'qemu';

/** One checkpoint's pause in its three steps, ms. lockstep: the supervisor's CheckpointTimes
 *  (block-io-hold, the secondary's checkpoint, block-io-release). QEMU's emulated barrier:
 *  freeze + `stop` (drain and flush), the secondary's checkpoint, `cont` + unfreeze. */
export interface PauseTimes {
  pauseMs: number;
  holdMs: number;
  checkpointMs: number;
  releaseMs: number;
}

/** A served disk under load: the NBD URI, and for a pair a way to take a checkpoint. */
export interface Target {
  uri: string;
  /** one checkpoint (under the load `load`, if any); null when skipped */
  checkpoint?: (load: ChildProcess | null) => Promise<PauseTimes | null>;
  /** the processes that serve and replicate, for CPU accounting */
  pids: number[];
  stop(): Promise<void>;
}

/** Records the target's processes in `ctx.live` until it is stopped. */
export function track(ctx: BenchContext, t: Target): Target {
  for (const pid of t.pids) ctx.live.add(pid);
  const stop = t.stop;
  return {
    ...t,
    stop: async () => {
      await stop();
      for (const pid of t.pids) ctx.live.delete(pid);
    },
  };
}

// ---- lockstep -----------------------------------------------------------------------------

export async function lockstepSingle(ctx: BenchContext, dir: string): Promise<Target> {
  const local = join(dir, 'primary.qcow2');
  await createQcow2(local, { size: ctx.sizeMiB * MiB });
  const sock = join(dir, 'disk.sock');
  const proc = await startLockstep(dir, 'single', [
    '--blockdev', `driver=qcow2,node-name=local0,file.driver=file,file.filename=${local}`,
    '--blockdev', 'driver=quorum,node-name=colo-disk0,read-pattern=fifo,vote-threshold=1,children.0=local0',
  ]);
  await proc.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
  await proc.qmp.execute('block-export-add', { type: 'nbd', id: 'disk', 'node-name': 'colo-disk0', name: 'disk', writable: true });
  return { uri: `nbd+unix:///disk?socket=${sock}`, pids: [proc.child.pid!], stop: () => proc.quit() };
}

/** A pair with the supervisor's heartbeat defaults and no automatic checkpoints; `extra`
 *  adds options (bench/copy-unit: copyUnit). */
export function newPair(ctx: BenchContext, dir: string, extra: Partial<PairOptions> = {}): PairSupervisor {
  return new PairSupervisor({
    dataDir: dir,
    size: ctx.sizeMiB * MiB,
    checkpointIntervalMs: 0,
    heartbeatIntervalMs: PAIR_DEFAULTS.heartbeatIntervalMs,
    heartbeatTimeoutMs: PAIR_DEFAULTS.heartbeatTimeoutMs,
    failover: 'auto',
    nbdSocket: join(dir, 'disk.sock'),
    log: (level, msg) => {
      if (level === 'error') console.error(`  [pair] ${msg}`);
    },
    ...extra,
  });
}

export async function lockstepPair(ctx: BenchContext, dir: string): Promise<Target> {
  const sup = newPair(ctx, dir);
  let pids: number[];
  try {
    await sup.start();
    pids = daemonPids(sup);
  } catch (e) {
    await sup.stop().catch(() => {});
    throw e;
  }
  return {
    uri: `nbd+unix:///disk?socket=${join(dir, 'disk.sock')}`,
    checkpoint: async () => {
      // the same CheckpointTimes the supervisor emits with its 'checkpoint' event
      const r = await sup.checkpoint();
      return { pauseMs: r.pauseMs, holdMs: r.holdMs, checkpointMs: r.checkpointMs, releaseMs: r.releaseMs };
    },
    pids,
    stop: () => sup.stop(),
  };
}

// ---- QEMU (same graph) --------------------------------------------------------------------

async function qemuPrimary(dir: string, local: string): Promise<Proc> {
  return startQemu(dir, 'primary', [
    '-drive', `if=none,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,children.0.driver=qcow2,children.0.file.filename=${local}`,
  ]);
}

export async function qemuServe(proc: Proc, device: string, sock: string): Promise<string> {
  await proc.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
  await proc.qmp.execute('nbd-server-add', { device, name: 'disk', writable: true });
  return `nbd+unix:///disk?socket=${sock}`;
}

export async function qemuSingle(ctx: BenchContext, dir: string): Promise<Target> {
  const local = join(dir, 'primary.qcow2');
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', local, `${ctx.sizeMiB}M`]);
  const proc = await qemuPrimary(dir, local);
  const uri = await qemuServe(proc, 'colo-disk0', join(dir, 'disk.sock'));
  return { uri, pids: [proc.child.pid!], stop: () => proc.quit() };
}

export interface QemuPair {
  primary: Proc;
  secondary: Proc;
  secSock: string;
  active: string;
  /** how long the last `stop` that drained took (the barrier's time limit follows it) */
  lastStopMs: number;
}

export async function qemuPairStart(ctx: BenchContext, dir: string): Promise<QemuPair> {
  const f = (n: string) => join(dir, n);
  for (const n of ['primary.qcow2', 'secondary.qcow2', 'active.qcow2', 'hidden.qcow2']) {
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', f(n), `${ctx.sizeMiB}M`]);
  }
  const secSock = f('secondary-nbd.sock');
  const secondary = await startQemu(dir, 'secondary', [
    '-drive', `if=none,id=parent0,driver=qcow2,file.filename=${f('secondary.qcow2')}`,
    '-drive',
    `if=none,id=childs0,driver=replication,mode=secondary,top-id=childs0,file.driver=qcow2,file.file.filename=${f('active.qcow2')},` +
      `file.backing.driver=qcow2,file.backing.file.filename=${f('hidden.qcow2')},file.backing.backing=parent0`,
  ]);
  let primary: Proc | null = null;
  try {
    await secondary.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: secSock } } });
    await secondary.qmp.execute('nbd-server-add', { device: 'parent0', writable: true });
    primary = await qemuPrimary(dir, f('primary.qcow2'));
    await qemuStartReplication(primary, secondary, secSock);
  } catch (e) {
    await primary?.kill();
    await secondary.kill();
    throw e;
  }
  return { primary, secondary, secSock, active: f('active.qcow2'), lastStopMs: 250 };
}

async function qemuStartReplication(primary: Proc, secondary: Proc, secSock: string): Promise<void> {
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
}

/**
 * QEMU has no block-io-hold, and xen-colo-do-checkpoint under forwarded writes aborts its
 * secondary ("First cluster in emptied image is in use"). So the checkpoint is taken the way
 * COLO takes it with a VM: the guest stops (the load is frozen with SIGSTOP), the primary
 * drains and flushes (`stop`), the secondary checkpoints, and both resume.
 * When fio is frozen between a request's header and its payload, QEMU's drain waits for the
 * payload forever: past a limit (4x the last good `stop`, within 50..1000 ms: `stop` also
 * flushes, which legitimately takes longer at low rates) the load is let go, the barrier
 * given up and the checkpoint skipped (null); the stall stays in the throughput figures.
 * Requests that fio sent before the freeze and that QEMU had not yet read can still arrive
 * during the checkpoint: a residual race of this emulation.
 * Resolves with the pause in its steps, or null when skipped.
 */
export async function qemuCheckpoint(p: QemuPair, load: ChildProcess | null): Promise<PauseTimes | null> {
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
    const t3 = nowMs();
    return { pauseMs: t3 - t0, holdMs: t1 - t0, checkpointMs: t2 - t1, releaseMs: t3 - t2 };
  } finally {
    if (frozen) load?.kill('SIGCONT');
  }
}

export async function qemuPair(ctx: BenchContext, dir: string): Promise<Target> {
  const p = await qemuPairStart(ctx, dir);
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
