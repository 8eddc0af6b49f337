// The pair supervisor: one process that drives a primary and a secondary `lockstep daemon`
// over QMP. It creates what is missing, runs the initial sync, starts replication in the
// right order (secondary first), exports the primary's disk to the user, takes consistent
// checkpoints (hold the guest's writes at the primary, checkpoint the secondary, release),
// watches both sides with a heartbeat, and fails over to the secondary when the primary dies.
//
// The daemons are either started here (one host) or already running and reached at their QMP
// addresses (two hosts; the supervisor then runs on the secondary's host or a third one, so
// that it outlives the primary). Between hosts every channel is TLS with x509 certificates
// verified on both ends: the supervisor's QMP connections and the primary's NBD forwarding;
// plain TCP to a non-loopback address needs `insecure`.
//
// Stages: starting -> syncing -> protected -> (failed-over | degraded) -> stopped; with manual
// failover, protected -> primary-lost (waiting for `lockstep pair failover`) -> failed-over.

import { EventEmitter } from 'node:events';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { QmpClient, type QmpClientAddress, type QmpClientOptions } from '../qmp/client.js';
import { errorMessage } from '../errors.js';
import { PairMetrics } from './metrics.js';
import {
  DISK_NODE,
  buildPrimary,
  buildSecondary,
  ensureImage,
  forwardNode,
  type ForwardAddress,
  type SideLayout,
} from './setup.js';

const LOCKSTEP_BIN = fileURLToPath(new URL('../../../bin/lockstep', import.meta.url));

export type PairStage = 'starting' | 'syncing' | 'protected' | 'primary-lost' | 'failed-over' | 'degraded' | 'stopped';

export interface PairTls {
  /** the supervisor's own credentials: ca-cert.pem, client-cert.pem, client-key.pem */
  dir: string;
  /** id of the tls-creds-x509 object (endpoint=server) on the secondary daemon, for its NBD server */
  serverCreds: string;
  /** id of the tls-creds-x509 object (endpoint=client) on the primary daemon, for forwarding */
  clientCreds: string;
}

export interface PairOptions {
  dataDir: string;
  /** virtual size of the disk in bytes (used when the images are created) */
  size: number;
  checkpointIntervalMs: number;
  heartbeatIntervalMs: number;
  heartbeatTimeoutMs: number;
  failover: 'auto' | 'manual';
  /** where the user's disk is served, on the serving side's host: a Unix socket (default
   *  DIR/disk.sock of the serving side) and, with nbdPort, TCP */
  nbdSocket?: string;
  nbdHost?: string;
  nbdPort?: number;
  /** attach to daemons already running instead of starting them */
  primaryQmp?: QmpClientAddress;
  secondaryQmp?: QmpClientAddress;
  /** data directories on each side's host (default: dataDir) */
  primaryDir?: string;
  secondaryDir?: string;
  /** where the secondary serves forwarded writes, as the primary reaches it (two hosts) */
  secondaryNbd?: { host: string; port: number };
  tls?: PairTls;
  /** allow plain TCP to non-loopback addresses */
  insecure?: boolean;
  log: (level: 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>) => void;
  /** progress of a copy (the initial sync, a failover's commit), for a terminal line */
  onProgress?: (done: number, total: number, etaSeconds: number | null, what?: 'initial sync' | 'resync' | 'failover commit') => void;
}

export const PAIR_DEFAULTS = {
  size: 1024 ** 3,
  checkpointIntervalMs: 1000,
  heartbeatIntervalMs: 100,
  heartbeatTimeoutMs: 500,
  failover: 'auto' as const,
  nbdHost: '127.0.0.1',
  nbdPort: 10809,
  secondaryNbdPort: 10810,
};

interface Side {
  name: 'primary' | 'secondary';
  qmp: QmpClient;
  child: ChildProcess | null;
  layout: SideLayout;
  lastAnswer: number;
  alive: boolean;
}

/** One checkpoint's timing: the pause the guest saw and its three steps. */
export interface CheckpointTimes {
  /** hold + secondary checkpoint + release */
  pauseMs: number;
  /** the secondary's xen-colo-do-checkpoint */
  checkpointMs: number;
  /** block-io-hold: a round trip plus the drain of in-flight writes */
  holdMs: number;
  /** block-io-release (with the changed-regions reset sent just before it) */
  releaseMs: number;
}

export interface PairStatus {
  stage: PairStage;
  role: string;
  checkpoints: number;
  'checkpoint-failures': number;
  'last-pause-ms': number | null;
  'pause-median-ms': number | null;
  'pause-p99-ms': number | null;
  /** bytes the secondary copied into its hidden disk since replication started */
  'hidden-copied-bytes': number;
  'dirty-clusters': number;
  'heartbeat-age-ms': number | null;
  serving: string[];
  /** degraded: bytes the primary changed since the last checkpoint the secondary confirmed */
  'changed-bytes'?: number;
  /** degraded: the file listing those regions (for a later re-protection) */
  'changed-regions-file'?: string;
  'last-error'?: string;
}

const EXPORT_NAME = 'disk';

function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || /^127\./.test(host);
}

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
  private changedBytes: number | undefined;
  private changedAt = 0;

  constructor(readonly opts: PairOptions) {
    super();
  }

  private get controlTimeoutMs(): number {
    return Math.max(2000, 4 * this.opts.heartbeatTimeoutMs);
  }

  /** A QMP command that gives up when the side stays silent (a cut link never answers). */
  private call(side: Side, command: string, args?: Record<string, unknown>, timeoutMs = this.controlTimeoutMs): Promise<unknown> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`the ${side.name} did not answer ${command} within ${timeoutMs} ms`)), timeoutMs);
    });
    return Promise.race([side.qmp.execute(command, args), timeout]).finally(() => clearTimeout(timer));
  }

  private layout(dir: string | undefined, attached: boolean): SideLayout {
    return { dir: dir ?? this.opts.dataDir, local: !attached };
  }

  /** Where the secondary serves forwarded writes: a Unix socket on one host, TCP between two. */
  private forwardAddress(): ForwardAddress {
    const o = this.opts;
    if (o.secondaryNbd) return { type: 'inet', host: o.secondaryNbd.host, port: o.secondaryNbd.port };
    const sq = o.secondaryQmp;
    if (sq && 'host' in sq) return { type: 'inet', host: sq.host, port: PAIR_DEFAULTS.secondaryNbdPort };
    return { type: 'unix', path: join(o.secondaryDir ?? o.dataDir, 'secondary-nbd.sock') };
  }

  /** Refuses plain TCP to another host unless `insecure` (before anything is started). */
  private checkTransport(): void {
    const o = this.opts;
    if (o.tls || o.insecure) return;
    const hosts: Array<[string, string]> = [];
    for (const [what, a] of [['primary QMP', o.primaryQmp], ['secondary QMP', o.secondaryQmp]] as const) {
      if (a && 'host' in a) hosts.push([what, a.host]);
    }
    const f = this.forwardAddress();
    if (f.type === 'inet') hosts.push(['the forwarding NBD address', f.host]);
    for (const [what, host] of hosts) {
      if (!isLoopback(host)) {
        throw new Error(`${what} ${host} is not a loopback address: give TLS credentials (--tls-dir) or allow plain TCP with --insecure`);
      }
    }
  }

  private qmpOptions(addr: QmpClientAddress): QmpClientOptions {
    const t = this.opts.tls;
    if (!t || !('host' in addr)) return {};
    const read = (f: string): Buffer => {
      try {
        return readFileSync(join(t.dir, f));
      } catch (e) {
        throw new Error(`TLS credentials: cannot read ${join(t.dir, f)}: ${errorMessage(e)}`);
      }
    };
    return {
      tls: {
        ca: read('ca-cert.pem'),
        cert: read('client-cert.pem'),
        key: read('client-key.pem'),
        // an IP address is checked against the certificate's IP SANs; a name is sent as SNI
        ...(isIP(addr.host) ? {} : { servername: addr.host }),
      },
    };
  }

  // ---- start-up -----------------------------------------------------------------------

  async start(): Promise<void> {
    const o = this.opts;
    this.checkTransport();
    mkdirSync(o.dataDir, { recursive: true });
    const pl = this.layout(o.primaryDir, o.primaryQmp !== undefined);
    const sl = this.layout(o.secondaryDir, o.secondaryQmp !== undefined);
    for (const l of [pl, sl]) if (l.local) mkdirSync(l.dir, { recursive: true });
    const forward = this.forwardAddress();
    const tls = o.tls;

    this.secondary = await this.launch('secondary', o.secondaryQmp, sl);
    this.primary = await this.launch('primary', o.primaryQmp, pl);
    const p = this.primary;
    const s = this.secondary;
    for (const side of [s, p]) if (!side.child) await this.checkFresh(side, side === s ? o.secondaryQmp! : o.primaryQmp!);
    // the disks are kept when they exist; the overlays are always recreated empty
    for (const [side, name, keep] of [
      [s, 'secondary.qcow2', true],
      [s, 'active.qcow2', false],
      [s, 'hidden.qcow2', false],
      [p, 'primary.qcow2', true],
    ] as const) {
      const r = await ensureImage(side.qmp, side.layout, name, o.size, keep);
      if (r === 'created') o.log('info', `created ${name}`, { side: side.name, dir: side.layout.dir, size: o.size });
    }
    if (forward.type === 'unix') rmSync(forward.path, { force: true });
    await buildSecondary(s.qmp, s.layout, forward, tls?.serverCreds);
    await buildPrimary(p.qmp, p.layout);
    const ioTimeoutS = Math.max(1, Math.ceil((2 * o.heartbeatTimeoutMs) / 1000));
    await p.qmp.execute('blockdev-add', { 'node-name': 'sync-target', ...forwardNode(forward, tls?.clientCreds, 0) });
    this.stage = 'syncing';
    await this.initialSync();
    await p.qmp.execute('blockdev-del', { 'node-name': 'sync-target' });
    // secondary first: no forwarded write may reach the secondary disk before its
    // copy-before-write filter is in place
    await s.qmp.execute('xen-set-replication', { enable: true, primary: false });
    await p.qmp.execute('blockdev-add', {
      driver: 'replication',
      'node-name': 'replication0',
      mode: 'primary',
      file: forwardNode(forward, tls?.clientCreds, ioTimeoutS),
    });
    await p.qmp.execute('x-blockdev-change', { parent: DISK_NODE, node: 'replication0' });
    await p.qmp.execute('xen-set-replication', { enable: true, primary: true });
    await this.serve(p, DISK_NODE);
    this.stage = 'protected';
    o.log('info', 'replication is running', { serving: this.serving, forward: forward.type === 'unix' ? forward.path : `${forward.host}:${forward.port}`, tls: !!tls });
    this.timers.push(setInterval(() => void this.heartbeat(), o.heartbeatIntervalMs));
    if (o.checkpointIntervalMs > 0) {
      this.timers.push(
        setInterval(() => {
          if (this.stage === 'protected' && !this.checkpointing) void this.checkpoint().catch(() => {});
        }, o.checkpointIntervalMs),
      );
    }
  }

  /** An attached daemon must be fresh: a pair half set up (say, by a supervisor that died)
   *  would otherwise fail later with a bare "Duplicate nodes". */
  private async checkFresh(side: Side, addr: QmpClientAddress): Promise<void> {
    const nodes = (await this.call(side, 'query-named-block-nodes', { flat: true })) as Array<{ 'node-name': string }>;
    if (nodes.length === 0) return;
    const where = 'path' in addr ? addr.path : `${addr.host}:${addr.port}`;
    // the names a user gave first; '#blockNNN' are automatic names of inner nodes
    const all = nodes.map((n) => n['node-name']);
    const named = all.filter((n) => !n.startsWith('#'));
    const shown = (named.length > 0 ? named : all).slice(0, 5);
    throw new Error(
      `the ${side.name} daemon at ${where} already has block nodes (${shown.join(', ')}${all.length > shown.length ? ', ...' : ''}): ` +
        'lockstep pair sets up freshly started daemons; restart it (lockstep pair host) and run again',
    );
  }

  private async launch(name: 'primary' | 'secondary', attach: QmpClientAddress | undefined, layout: SideLayout): Promise<Side> {
    if (attach) {
      let qmp: QmpClient;
      try {
        qmp = await QmpClient.open(attach, this.qmpOptions(attach));
      } catch (e) {
        const where = 'path' in attach ? attach.path : `${attach.host}:${attach.port}`;
        throw new Error(`cannot reach the ${name} daemon's QMP at ${where}: ${errorMessage(e)}`);
      }
      return this.watch({ name, qmp, child: null, layout, lastAnswer: Date.now(), alive: true });
    }
    const sock = join(this.opts.dataDir, `${name}.qmp`);
    rmSync(sock, { force: true });
    const child = spawn(
      process.execPath,
      [LOCKSTEP_BIN, 'daemon', '--chardev', `socket,id=mon0,path=${sock},server=on,wait=off`, '--monitor', 'chardev=mon0'],
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
    return this.watch({ name, qmp, child, layout, lastAnswer: Date.now(), alive: true });
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
      this.opts.onProgress?.(j.offset, j.len, eta, 'initial sync');
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
    const addrs: Array<{ type: 'unix' | 'inet'; data: Record<string, string> }> = [];
    const sock = o.nbdSocket ?? join(side.layout.dir, 'disk.sock');
    // a stale socket of the dead side on this host would make the listen fail
    if (side.layout.local) rmSync(sock, { force: true });
    addrs.push({ type: 'unix', data: { path: sock } });
    if (o.nbdPort) addrs.push({ type: 'inet', data: { host: o.nbdHost ?? '127.0.0.1', port: String(o.nbdPort) } });
    this.serving = [];
    for (const [i, addr] of addrs.entries()) {
      // one NBD server per daemon: the first address starts it, the others are added to it
      await this.call(side, i === 0 ? 'nbd-server-start' : 'x-nbd-server-listen', { addr });
      this.serving.push(
        addr.type === 'unix'
          ? `nbd+unix:///${EXPORT_NAME}?socket=${addr.data.path}`
          : `nbd://${addr.data.host}:${addr.data.port}/${EXPORT_NAME}`,
      );
    }
    await this.call(side, 'block-export-add', { type: 'nbd', id: EXPORT_NAME, 'node-name': node, name: EXPORT_NAME, writable: true });
  }

  // ---- checkpoints ----------------------------------------------------------------------

  /** A consistent checkpoint: hold the guest's writes, checkpoint the secondary, release. */
  checkpoint(): Promise<CheckpointTimes> {
    if (this.stage !== 'protected') return Promise.reject(new Error(`no checkpoint in stage ${this.stage}`));
    if (this.failingOver) return Promise.reject(new Error('no checkpoint while failing over'));
    // one at a time: a checkpoint asked for while the timer's runs (its hold would find the
    // node already held) follows it
    const running = this.checkpointing;
    if (running) return running.then(() => {}, () => {}).then(() => this.checkpoint());
    const run = (async () => {
      const p = this.primary!;
      const s = this.secondary!;
      const t0 = process.hrtime.bigint();
      try {
        await this.call(p, 'block-io-hold', { 'node-name': DISK_NODE });
      } catch (e) {
        // A hold that timed out may still take effect later: release it whenever it does,
        // so that the guest's writes are never left held ("not held" errors are expected).
        void this.call(p, 'block-io-release', { 'node-name': DISK_NODE }, 60_000).catch(() => {});
        this.metrics.checkpointFailures++;
        this.lastError = `checkpoint failed: the hold on the primary failed: ${errorMessage(e)}`;
        this.opts.log('error', this.lastError);
        throw e;
      }
      const t1 = process.hrtime.bigint();
      let err: unknown = null;
      try {
        await this.call(s, 'xen-colo-do-checkpoint');
      } catch (e) {
        err = e;
      }
      const t2 = process.hrtime.bigint();
      // Still inside the barrier: the secondary now holds everything the primary changed, so
      // the primary's changed-regions record starts afresh. Sent back to back with the
      // release (one monitor runs its commands in order), so it costs no extra round trip.
      const reset = err ? Promise.resolve() : this.call(p, 'x-replication-reset-changed');
      await Promise.all([reset, this.call(p, 'block-io-release', { 'node-name': DISK_NODE })]);
      const t3 = process.hrtime.bigint();
      const pauseMs = Number(t3 - t0) / 1e6;
      const checkpointMs = Number(t2 - t1) / 1e6;
      const times: CheckpointTimes = { pauseMs, checkpointMs, holdMs: Number(t1 - t0) / 1e6, releaseMs: Number(t3 - t2) / 1e6 };
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
      this.emit('checkpoint', times);
      return times;
    })();
    this.checkpointing = run;
    void run.finally(() => {
      if (this.checkpointing === run) this.checkpointing = null;
    }).catch(() => {});
    return run;
  }

  private async refreshCounters(): Promise<void> {
    const list = (await this.call(this.secondary!, 'query-replication')) as Array<{ 'bytes-copied': number; 'dirty-clusters': number }>;
    this.metrics.hiddenCopiedBytes = list.reduce((a, x) => a + x['bytes-copied'], 0);
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
    if (this.stage === 'degraded' && Date.now() - this.changedAt >= 1000) {
      this.changedAt = Date.now();
      await this.recordChanged().catch(() => {});
    }
  }

  private async sideDied(side: Side): Promise<void> {
    if (this.stage === 'stopped') return;
    if (side.name === 'primary') {
      if (this.stage === 'failed-over' || this.failingOver) return;
      if (this.opts.failover === 'auto' && this.secondary?.alive) {
        await this.failover('the primary died').catch(() => {});
        return;
      }
      if (this.stage === 'protected') this.stage = 'primary-lost';
      this.lastError = this.secondary?.alive
        ? 'the primary died; failover is manual: run `lockstep pair failover`'
        : 'the primary died and the secondary is not running: nothing can serve the disk';
      this.opts.log('error', this.lastError);
      this.emit('primary-lost');
    } else if (this.stage === 'protected') {
      this.stage = 'degraded';
      this.lastError = 'the secondary died: the primary keeps serving without protection';
      this.opts.log('error', this.lastError);
      await this.checkpointing?.catch(() => {});
      await this.recordChanged().catch((e: unknown) => this.opts.log('warn', `cannot read the changed regions: ${errorMessage(e)}`));
      this.emit('degraded');
    }
  }

  /** The file where a degraded pair lists what changed since the last confirmed checkpoint. */
  get changedRegionsFile(): string {
    return join(this.opts.dataDir, 'changed-regions.json');
  }

  /** Reads the primary's changed regions and writes them where a re-protection will look. */
  private async recordChanged(): Promise<void> {
    const p = this.primary;
    if (!p || !p.alive) return;
    const list = (await this.call(p, 'x-query-replication-changed')) as Array<{ bytes: number }>;
    this.changedBytes = list.reduce((a, x) => a + x.bytes, 0);
    this.metrics.changedBytes = this.changedBytes;
    this.changedAt = Date.now();
    const tmp = `${this.changedRegionsFile}.tmp`;
    writeFileSync(tmp, JSON.stringify({ time: new Date().toISOString(), nodes: list }, null, 1) + '\n');
    // rename: a reader never sees half a file
    renameSync(tmp, this.changedRegionsFile);
  }

  /** Fails over to the secondary and serves the recovered disk. */
  failover(reason = 'requested'): Promise<void> {
    if (this.failingOver) return this.failingOver;
    const run = (async () => {
      const s = this.secondary;
      if (!s || !s.alive) throw new Error('the secondary is not running');
      const t0 = Date.now();
      this.opts.log('warn', `failing over: ${reason}`);
      const p = this.primary;
      if (p?.alive && p.child) p.child.kill('SIGKILL');
      else if (p?.alive) {
        // a primary on another host that still answers (manual failover): stop its export so
        // that the guest cannot go on writing to a disk that is no longer the one served
        await this.call(p, 'nbd-server-stop', undefined, 1000).catch((e: unknown) =>
          this.opts.log('warn', `could not fence the primary's export: ${errorMessage(e)}`),
        );
      }
      // Fence first: close the export of forwarded writes so that a primary that is only
      // partly dead (a cut link that comes back) can never write to the recovered disk.
      await this.call(s, 'nbd-server-stop');
      // commits active+hidden into the secondary disk
      await this.call(s, 'xen-set-replication', { enable: false, primary: false, failover: true });
      for (;;) {
        const list = (await this.call(s, 'query-replication')) as Array<{ stage: string; 'commit-progress'?: { current: number; total: number } }>;
        const cp = list.find((x) => x['commit-progress'])?.['commit-progress'];
        if (cp) this.opts.onProgress?.(cp.current, cp.total, null, 'failover commit');
        if (list.every((x) => x.stage === 'done')) break;
        if (list.some((x) => x.stage === 'failover-failed')) throw new Error('the failover commit failed');
        await new Promise((r) => setTimeout(r, 10));
      }
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

  /** Process ids of the daemons this supervisor started (none for attached daemons). */
  pids(): { primary?: number; secondary?: number } {
    const out: { primary?: number; secondary?: number } = {};
    if (this.primary?.child?.pid !== undefined) out.primary = this.primary.child.pid;
    if (this.secondary?.child?.pid !== undefined) out.secondary = this.secondary.child.pid;
    return out;
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
      role: this.stage === 'failed-over' ? 'secondary serving' : this.stage === 'primary-lost' ? 'none serving' : 'primary serving',
      checkpoints: this.metrics.checkpoints,
      'checkpoint-failures': this.metrics.checkpointFailures,
      'last-pause-ms': this.lastPauseMs,
      'pause-median-ms': q(this.metrics.pause.quantile(0.5)),
      'pause-p99-ms': q(this.metrics.pause.quantile(0.99)),
      'hidden-copied-bytes': this.metrics.hiddenCopiedBytes,
      'dirty-clusters': this.metrics.dirtyClusters,
      'heartbeat-age-ms': this.primary ? Date.now() - this.primary.lastAnswer : null,
      serving: this.serving,
    };
    if (this.changedBytes !== undefined) {
      st['changed-bytes'] = this.changedBytes;
      st['changed-regions-file'] = this.changedRegionsFile;
    }
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
      // daemons started here end with the supervisor; attached ones are the operator's
      if (side.alive && side.child) await this.call(side, 'quit', undefined, 2000).catch(() => {});
      side.qmp.close();
      // a process killed by a signal has exitCode null and signalCode set
      if (side.child && side.child.exitCode === null && side.child.signalCode === null) {
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
