// The pair supervisor: one process that drives a primary and a secondary `lockstep daemon`
// over QMP. It creates what is missing, runs the initial sync, starts replication in the
// right order (secondary first), exports the primary's disk to the user, takes consistent
// checkpoints (hold the guest's writes at the primary, checkpoint the secondary, release),
// watches both sides with a heartbeat, and fails over to the secondary when the primary dies.
//
// Stages: starting -> syncing -> protected -> (failed-over | degraded) -> stopped.

import { EventEmitter } from 'node:events';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { QmpClient, type QmpClientAddress } from '../qmp/client.js';
import { createQcow2 } from '../block/drivers/qcow2/create.js';
import { errorMessage } from '../errors.js';
import { PairMetrics } from './metrics.js';

const LOCKSTEP_BIN = fileURLToPath(new URL('../../../bin/lockstep', import.meta.url));

export type PairStage = 'starting' | 'syncing' | 'protected' | 'failed-over' | 'degraded' | 'stopped';

export interface PairOptions {
  dataDir: string;
  /** virtual size of the disk in bytes (used when the images are created) */
  size: number;
  checkpointIntervalMs: number;
  heartbeatIntervalMs: number;
  heartbeatTimeoutMs: number;
  failover: 'auto' | 'manual';
  /** where the user's disk is served: a Unix socket and/or a TCP address */
  nbdSocket?: string;
  nbdHost?: string;
  nbdPort?: number;
  /** attach to daemons already running instead of starting them */
  primaryQmp?: QmpClientAddress;
  secondaryQmp?: QmpClientAddress;
  log: (level: 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>) => void;
  /** progress of the initial sync, for a terminal line */
  onProgress?: (done: number, total: number, etaSeconds: number | null) => void;
}

export const PAIR_DEFAULTS = {
  size: 1024 ** 3,
  checkpointIntervalMs: 1000,
  heartbeatIntervalMs: 100,
  heartbeatTimeoutMs: 500,
  failover: 'auto' as const,
  nbdHost: '127.0.0.1',
  nbdPort: 10809,
};

interface Side {
  name: 'primary' | 'secondary';
  qmp: QmpClient;
  child: ChildProcess | null;
  lastAnswer: number;
  alive: boolean;
}

export interface PairStatus {
  stage: PairStage;
  role: string;
  checkpoints: number;
  'checkpoint-failures': number;
  'last-pause-ms': number | null;
  'pause-median-ms': number | null;
  'pause-p99-ms': number | null;
  'bytes-forwarded': number;
  'dirty-clusters': number;
  'heartbeat-age-ms': number | null;
  'serving': string[];
  'last-error'?: string;
}

const DISK_NODE = 'colo-disk0';
const EXPORT_NAME = 'disk';

export class PairSupervisor extends EventEmitter {
  stage: PairStage = 'starting';
  readonly metrics = new PairMetrics();
  private primary: Side | null = null;
  private secondary: Side | null = null;
  private timers: NodeJS.Timeout[] = [];
  private lastPauseMs: number | null = null;
  private lastError: string | undefined;
  private checkpointing: Promise<unknown> | null = null;
  private failingOver: Promise<void> | null = null;
  private serving: string[] = [];

  constructor(readonly opts: PairOptions) {
    super();
  }

  private file(name: string): string {
    return join(this.opts.dataDir, name);
  }

  // ---- start-up -----------------------------------------------------------------------

  async start(): Promise<void> {
    const o = this.opts;
    mkdirSync(o.dataDir, { recursive: true });
    for (const name of ['primary.qcow2', 'secondary.qcow2', 'active.qcow2', 'hidden.qcow2']) {
      const f = this.file(name);
      // overlays are always recreated empty; the disks are kept
      if (name === 'active.qcow2' || name === 'hidden.qcow2' || !existsSync(f)) {
        rmSync(f, { force: true });
        await createQcow2(f, { size: o.size });
      }
    }
    this.secondary = await this.launch('secondary', o.secondaryQmp, [
      '--blockdev', `driver=qcow2,node-name=parent0,file.driver=file,file.filename=${this.file('secondary.qcow2')}`,
      '--blockdev',
      `driver=replication,node-name=childs0,mode=secondary,top-id=childs0,file.driver=qcow2,file.file.driver=file,file.file.filename=${this.file('active.qcow2')},` +
        `file.backing.driver=qcow2,file.backing.file.driver=file,file.backing.file.filename=${this.file('hidden.qcow2')},file.backing.backing=parent0`,
      '--nbd-server', `addr.type=unix,addr.path=${this.file('secondary-nbd.sock')}`,
      '--export', 'type=nbd,id=parent0,node-name=parent0,name=parent0,writable=on',
    ]);
    this.primary = await this.launch('primary', o.primaryQmp, [
      '--blockdev', `driver=qcow2,node-name=local0,file.driver=file,file.filename=${this.file('primary.qcow2')}`,
      '--blockdev', `driver=quorum,node-name=${DISK_NODE},read-pattern=fifo,vote-threshold=1,children.0=local0`,
    ]);
    const p = this.primary.qmp;
    const s = this.secondary.qmp;
    await p.execute('blockdev-add', {
      driver: 'nbd',
      'node-name': 'sync-target',
      server: { type: 'unix', path: this.file('secondary-nbd.sock') },
      export: 'parent0',
    });
    this.stage = 'syncing';
    await this.initialSync();
    await p.execute('blockdev-del', { 'node-name': 'sync-target' });
    // secondary first: no forwarded write may reach the secondary disk before its
    // copy-before-write filter is in place
    await s.execute('xen-set-replication', { enable: true, primary: false });
    await p.execute('blockdev-add', {
      driver: 'replication',
      'node-name': 'replication0',
      mode: 'primary',
      file: { driver: 'nbd', server: { type: 'unix', path: this.file('secondary-nbd.sock') }, export: 'parent0' },
    });
    await p.execute('x-blockdev-change', { parent: DISK_NODE, node: 'replication0' });
    await p.execute('xen-set-replication', { enable: true, primary: true });
    await this.serve(this.primary, DISK_NODE);
    this.stage = 'protected';
    o.log('info', 'replication is running', { serving: this.serving });
    this.timers.push(setInterval(() => void this.heartbeat(), o.heartbeatIntervalMs));
    if (o.checkpointIntervalMs > 0) {
      this.timers.push(
        setInterval(() => {
          if (this.stage === 'protected' && !this.checkpointing) void this.checkpoint().catch(() => {});
        }, o.checkpointIntervalMs),
      );
    }
  }

  private async launch(name: 'primary' | 'secondary', attach: QmpClientAddress | undefined, args: string[]): Promise<Side> {
    if (attach) {
      const qmp = await QmpClient.open(attach);
      return this.watch({ name, qmp, child: null, lastAnswer: Date.now(), alive: true });
    }
    const sock = this.file(`${name}.qmp`);
    rmSync(sock, { force: true });
    const child = spawn(
      process.execPath,
      [LOCKSTEP_BIN, 'daemon', '--chardev', `socket,id=mon0,path=${sock},server=on,wait=off`, '--monitor', 'chardev=mon0', ...args],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
    let stderr = '';
    child.stderr?.on('data', (d: Buffer) => {
      stderr = (stderr + d.toString()).slice(-8192);
    });
    for (let i = 0; !existsSync(sock); i++) {
      if (child.exitCode !== null || i > 200) throw new Error(`the ${name} daemon did not start: ${stderr.trim()}`);
      await new Promise((r) => setTimeout(r, 50));
    }
    const qmp = await QmpClient.open({ path: sock });
    return this.watch({ name, qmp, child, lastAnswer: Date.now(), alive: true });
  }

  private watch(side: Side): Side {
    side.child?.once('exit', (code, signal) => {
      side.alive = false;
      this.opts.log('warn', `the ${side.name} daemon exited`, { code, signal });
      void this.sideDied(side);
    });
    side.qmp.on('close', () => {
      if (side.alive) {
        side.alive = false;
        void this.sideDied(side);
      }
    });
    return side;
  }

  private async initialSync(): Promise<void> {
    const p = this.primary!.qmp;
    const started = Date.now();
    await p.execute('blockdev-mirror', { 'job-id': 'lockstep-sync', device: DISK_NODE, target: 'sync-target', sync: 'full' });
    for (;;) {
      const jobs = (await p.execute('query-block-jobs')) as Array<{ device: string; offset: number; len: number; ready: boolean }>;
      const j = jobs.find((x) => x.device === 'lockstep-sync');
      if (!j) throw new Error('the initial sync ended before it was ready');
      const elapsed = (Date.now() - started) / 1000;
      const eta = j.offset > 0 ? (elapsed * (j.len - j.offset)) / j.offset : null;
      this.opts.onProgress?.(j.offset, j.len, eta);
      if (j.ready) break;
      await new Promise((r) => setTimeout(r, 200));
    }
    const done = p.waitEvent('BLOCK_JOB_COMPLETED', (d) => d.device === 'lockstep-sync', 60_000);
    await p.execute('block-job-cancel', { device: 'lockstep-sync' });
    await done;
    this.opts.log('info', 'initial sync done', { seconds: (Date.now() - started) / 1000 });
  }

  /** Serves `node` of `side` on the user's addresses under the export name "disk". */
  private async serve(side: Side, node: string): Promise<void> {
    const o = this.opts;
    const q = side.qmp;
    const addrs: Array<{ type: 'unix' | 'inet'; data: Record<string, string> }> = [];
    if (o.nbdSocket) {
      rmSync(o.nbdSocket, { force: true });
      addrs.push({ type: 'unix', data: { path: o.nbdSocket } });
    }
    if (o.nbdPort) addrs.push({ type: 'inet', data: { host: o.nbdHost ?? '127.0.0.1', port: String(o.nbdPort) } });
    this.serving = [];
    for (const [i, addr] of addrs.entries()) {
      // one NBD server per daemon: the first address starts it, the others are added to it
      await q.execute(i === 0 ? 'nbd-server-start' : 'x-nbd-server-listen', { addr });
      this.serving.push(
        addr.type === 'unix'
          ? `nbd+unix:///${EXPORT_NAME}?socket=${addr.data.path}`
          : `nbd://${addr.data.host}:${addr.data.port}/${EXPORT_NAME}`,
      );
    }
    await q.execute('block-export-add', { type: 'nbd', id: EXPORT_NAME, 'node-name': node, name: EXPORT_NAME, writable: true });
  }

  // ---- checkpoints ----------------------------------------------------------------------

  /** A consistent checkpoint: hold the guest's writes, checkpoint the secondary, release. */
  checkpoint(): Promise<{ pauseMs: number; checkpointMs: number }> {
    if (this.stage !== 'protected') return Promise.reject(new Error(`no checkpoint in stage ${this.stage}`));
    const run = (async () => {
      const p = this.primary!.qmp;
      const s = this.secondary!.qmp;
      const t0 = process.hrtime.bigint();
      await p.execute('block-io-hold', { 'node-name': DISK_NODE });
      const t1 = process.hrtime.bigint();
      let err: unknown = null;
      try {
        await s.execute('xen-colo-do-checkpoint');
      } catch (e) {
        err = e;
      }
      const t2 = process.hrtime.bigint();
      await p.execute('block-io-release', { 'node-name': DISK_NODE });
      const t3 = process.hrtime.bigint();
      const pauseMs = Number(t3 - t0) / 1e6;
      const checkpointMs = Number(t2 - t1) / 1e6;
      if (err) {
        this.metrics.checkpointFailures++;
        this.lastError = `checkpoint failed: ${errorMessage(err)}`;
        this.opts.log('error', this.lastError);
        throw err;
      }
      this.metrics.checkpoints++;
      this.metrics.pause.observe(pauseMs / 1000);
      this.metrics.checkpointTime.observe(checkpointMs / 1000);
      this.lastPauseMs = pauseMs;
      await this.refreshCounters().catch(() => {});
      this.emit('checkpoint', { pauseMs, checkpointMs });
      return { pauseMs, checkpointMs };
    })();
    this.checkpointing = run;
    void run.finally(() => {
      if (this.checkpointing === run) this.checkpointing = null;
    }).catch(() => {});
    return run;
  }

  private async refreshCounters(): Promise<void> {
    const list = (await this.secondary!.qmp.execute('query-replication')) as Array<{ 'bytes-copied': number; 'dirty-clusters': number }>;
    this.metrics.bytesForwarded = list.reduce((a, x) => a + x['bytes-copied'], 0);
    this.metrics.dirtyClusters = list.reduce((a, x) => a + x['dirty-clusters'], 0);
  }

  // ---- heartbeat and failure handling ----------------------------------------------

  private async heartbeat(): Promise<void> {
    const o = this.opts;
    for (const side of [this.primary, this.secondary]) {
      if (!side || !side.alive) continue;
      const ping = side.qmp.execute('query-version').then(() => {
        side.lastAnswer = Date.now();
      });
      const timeout = new Promise((r) => setTimeout(r, o.heartbeatTimeoutMs));
      await Promise.race([ping.catch(() => {}), timeout]);
      if (Date.now() - side.lastAnswer > o.heartbeatTimeoutMs) {
        side.alive = false;
        o.log('warn', `the ${side.name} missed its heartbeat`, { ageMs: Date.now() - side.lastAnswer });
        void this.sideDied(side);
      }
    }
    if (this.primary) this.metrics.heartbeatAgeSeconds = (Date.now() - this.primary.lastAnswer) / 1000;
  }

  private async sideDied(side: Side): Promise<void> {
    if (this.stage === 'stopped') return;
    if (side.name === 'primary') {
      if (this.stage === 'failed-over' || this.failingOver) return;
      if (this.opts.failover === 'auto' && this.secondary?.alive) await this.failover('the primary died').catch(() => {});
      else this.lastError = 'the primary died; failover is manual: run `lockstep pair failover`';
    } else if (this.stage === 'protected') {
      this.stage = 'degraded';
      this.lastError = 'the secondary died: the primary keeps serving without protection';
      this.opts.log('error', this.lastError);
      this.emit('degraded');
    }
  }

  /** Fails over to the secondary and serves the recovered disk. */
  failover(reason = 'requested'): Promise<void> {
    if (this.failingOver) return this.failingOver;
    const run = (async () => {
      const s = this.secondary;
      if (!s || !s.alive) throw new Error('the secondary is not running');
      const t0 = Date.now();
      this.opts.log('warn', `failing over: ${reason}`);
      if (this.primary?.alive && this.primary.child) this.primary.child.kill('SIGKILL');
      // fences the secondary disk's export and commits active+hidden into it
      await s.qmp.execute('xen-set-replication', { enable: false, primary: false, failover: true });
      for (;;) {
        const list = (await s.qmp.execute('query-replication')) as Array<{ stage: string }>;
        if (list.every((x) => x.stage === 'done')) break;
        if (list.some((x) => x.stage === 'failover-failed')) throw new Error('the failover commit failed');
        await new Promise((r) => setTimeout(r, 10));
      }
      await s.qmp.execute('nbd-server-stop');
      await this.serve(s, 'childs0');
      this.stage = 'failed-over';
      this.opts.log('warn', 'failed over: the recovered disk is served by the secondary', {
        serving: this.serving,
        ms: Date.now() - t0,
      });
      this.emit('failed-over', { ms: Date.now() - t0, serving: this.serving });
    })();
    this.failingOver = run;
    run.catch((e: unknown) => {
      this.lastError = `failover failed: ${errorMessage(e)}`;
      this.opts.log('error', this.lastError);
      this.failingOver = null;
    });
    return run;
  }

  /** Kills the primary daemon with SIGKILL (the demo's and tests' simulated crash). */
  crashPrimary(): void {
    const c = this.primary?.child;
    if (!c) throw new Error('the primary daemon was not started by this supervisor');
    c.kill('SIGKILL');
  }

  // ---- status and shutdown ----------------------------------------------------------

  status(): PairStatus {
    const q = (x: number | null) => (x === null ? null : x * 1000);
    const st: PairStatus = {
      stage: this.stage,
      role: this.stage === 'failed-over' ? 'secondary serving' : 'primary serving',
      checkpoints: this.metrics.checkpoints,
      'checkpoint-failures': this.metrics.checkpointFailures,
      'last-pause-ms': this.lastPauseMs,
      'pause-median-ms': q(this.metrics.pause.quantile(0.5)),
      'pause-p99-ms': q(this.metrics.pause.quantile(0.99)),
      'bytes-forwarded': this.metrics.bytesForwarded,
      'dirty-clusters': this.metrics.dirtyClusters,
      'heartbeat-age-ms': this.primary ? Date.now() - this.primary.lastAnswer : null,
      serving: this.serving,
    };
    if (this.lastError) st['last-error'] = this.lastError;
    return st;
  }

  async stop(): Promise<void> {
    this.stage = 'stopped';
    for (const t of this.timers) clearInterval(t);
    this.timers = [];
    await this.checkpointing?.catch(() => {});
    for (const side of [this.primary, this.secondary]) {
      if (!side) continue;
      if (side.alive) await side.qmp.execute('quit').catch(() => {});
      side.qmp.close();
      if (side.child && side.child.exitCode === null) {
        await new Promise<void>((r) => {
          const t = setTimeout(() => {
            side.child!.kill('SIGKILL');
            r();
          }, 5000);
          side.child!.once('exit', () => {
            clearTimeout(t);
            r();
          });
        });
      }
    }
  }
}
