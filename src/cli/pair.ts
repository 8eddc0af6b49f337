// `lockstep pair`: run and supervise a primary/secondary replication pair, or talk to a
// running supervisor (`status`, `checkpoint`, `failover`, `reprotect`, `resolve`).

import { parseArgs } from 'node:util';
import { createServer } from 'node:http';
import { resolve, join } from 'node:path';
import { rmSync } from 'node:fs';
import { parseSize } from '../block/options.js';
import { errorMessage } from '../errors.js';
import { PAIR_DEFAULTS, PairSupervisor, type PairOptions, type PairStatus } from '../pair/supervisor.js';
import { claimControl, controlRequest, serveControl } from '../pair/control.js';
import { defaultLogFormat, formatHuman, parseLogFormat, type LogFormat } from '../util/log.js';
import { LiveLine, bytesText, progressText } from './terminal.js';
import { CHECK_EXIT, checkCode, checkLine, renderStatus, type Status } from './pair-status.js';
import { notifyReady, takeNotifySocket } from './systemd.js';
import { RESOLVE_EXIT } from '../pair/split-brain.js';
import { PAIR_COPY_UNITS } from '../pair/setup.js';
import { takeover, type TakeoverOptions } from '../pair/takeover.js';
import { outdatePeerByHand } from '../pair/outdate.js';
import { parseLeaseExpiry } from '../pair/lease.js';
import { isLoopbackAddress, qmpOptions } from '../pair/sides.js';
import type { SocketAddress } from '../util/socket-address.js';

const HELP = `Usage: lockstep pair [run] [options]
       lockstep pair status [--json] [--watch [--interval T]] [--check] [--data-dir DIR | --control PATH]
       lockstep pair checkpoint|failover|reprotect [--data-dir DIR | --control PATH]
       lockstep pair resolve --keep primary|secondary [--json] [--data-dir DIR | --control PATH]
       lockstep pair host --listen HOST:PORT (--tls-dir DIR | --insecure) [daemon options]
       lockstep pair takeover --qmp ADDR --dir DIR [--nbd-socket PATH] [--lease T|off] [--tls-dir DIR | --insecure]
       lockstep pair outdate-peer --dir DIR --qmp ADDR [--peer-dir DIR] [--tls-dir DIR | --insecure]

Runs a primary and a secondary lockstep daemon on this machine (or drives running ones),
copies the disk once, starts replication, serves the primary's disk over NBD, takes a
consistent checkpoint every interval and fails over to the secondary when the primary dies.
A lost secondary is brought back by itself (restarted here, or its QMP address retried on
two hosts, with a growing delay), resynced from the two change records while the primary
keeps serving, and the pair is protected again; 'lockstep pair reprotect' does it now.
After a failover, 'lockstep pair reprotect' makes the survivor the primary while it serves
and resyncs the old primary's disk as its secondary; across two hosts the supervisor does it
by itself once the old primary's 'lockstep pair host' answers again (status shows the wait).
A split brain found then copies nothing and waits for 'lockstep pair resolve' while the
survivor serves on.

Two hosts: run 'lockstep pair host' on each (a lockstep daemon whose QMP monitor listens on
HOST:PORT with TLS), then 'lockstep pair run' on the secondary's host (or a third one) with
--primary-qmp, --secondary-qmp and --tls-dir. The TLS directory holds ca-cert.pem and
server-cert.pem/server-key.pem (the daemons) and client-cert.pem/client-key.pem (the
primary's forwarding and the supervisor); both ends of every connection verify the peer.

Options:
  --data-dir DIR             images, sockets and logs (default ./lockstep-data)
  --size SIZE                disk size when the images are created (default 1G)
  --checkpoint-interval T    time between checkpoints, e.g. 1s, 250ms, 0.1 (seconds);
                             0 = on demand only (default 1s)
  --heartbeat-interval T     (default 100ms)
  --heartbeat-timeout T      the primary is dead after this long without an answer (default 500ms)
  --failover auto|manual     fail over by itself or wait for 'lockstep pair failover' (default auto)
  --flush-commit on|off      a flush or FUA write completes once a checkpoint covers it
                             (default on; off for COLO with a VM, whose outputs are held)
  --lease T|off              the primary's write lease (default: the heartbeat timeout)
  --on-lease-expiry hold|io-error
                             writes once the primary's lease ran out, as DRBD's
                             on-no-quorum: held until it is renewed (hold, DRBD's
                             suspend-io; the default) or failed with EIO (io-error)
  --resync-rate BYTES/s      the rate of a resync while the primary serves, e.g. 50M
                             (default: unlimited)
  --dirty-extent SIZE        what each disk's dirty log syncs before the first write into
                             it, a power of two from 64K (every granule, exact after a
                             crash) to 1G; after a crash a resync copies whole extents
                             (default 4M)
  --copy-unit SIZE           the secondary's copy-before-write unit and its hidden disk's
                             cluster size, a power of two from 4K to 64K: random writes
                             between checkpoints copy this much old data each (default
                             64K, as QEMU)
  --reprotect on|off         bring a lost secondary back by itself, and across two hosts
                             re-protect after a failover once the failed side's daemon
                             answers again (default on; off: 'lockstep pair reprotect')
  --nbd-socket PATH          serve the disk on this Unix socket (default DATA/disk.sock)
  --nbd-port N               and on 127.0.0.1:N (default 10809; 0 = no TCP)
  --metrics HOST:PORT        Prometheus endpoint (/metrics)
  --nbd-host HOST            the TCP address the disk is served on (default 127.0.0.1)
  --primary-qmp ADDR         attach to a running primary daemon (PATH or HOST:PORT)
  --secondary-qmp ADDR       attach to a running secondary daemon
  --primary-dir DIR          images on the primary's host (default: --data-dir)
  --secondary-dir DIR        images on the secondary's host (default: --data-dir)
  --secondary-nbd HOST:PORT  where the primary forwards writes to (default: the secondary's
                             QMP host, port 10810; a Unix socket on one host)
  --tls-dir DIR              the supervisor's certificates (ca-cert.pem, client-cert.pem,
                             client-key.pem) for TLS to the daemons
  --tls-creds ID             the daemons' server credentials object (default tls0)
  --tls-client-creds ID      the primary daemon's client credentials object (default tls1)
  --insecure                 allow plain TCP between hosts (no TLS)
  --control PATH             the supervisor's control socket (default DATA/pair.sock)
  --force-current SIDE       primary|secondary: declare that disk current and copy it whole
                             onto the other (for disks without generation records, e.g. a
                             data directory from before them, an image you bring, or after
                             a split brain); without it the pair never guesses

  --log-format json|human    logs on stderr: human on a terminal, json otherwise (default)

pair resolve (a split brain: both disks changed since they diverged; the pair waits in
stage split-brain, serving and copying nothing):
  --keep SIDE                primary|secondary: the disk to keep. The other side's whole disk
                             is first saved beside it (split-brain-SIDE-TIME.qcow2, a qcow2
                             qemu-img reads, and a .json describing it), then overwritten
                             where the two differ; the pair is then protected. Found
                             while a survivor serves: keeping it resyncs the other live
                             (its clients stay connected); keeping the other stops it
                             serving and sets the pair up again from the kept disk
  --json                     the result as JSON
  exit codes: 0 resolved, 1 error, 2 nothing to resolve (not in split brain), 3 refused
  (e.g. the side to keep is inconsistent), 4 no supervisor runs (start the pair: a split
  brain makes it wait in stage split-brain, then run resolve)

pair status options:
  --json                     the status object as JSON (the default when stdout is not a
                             terminal)
  --watch                    refresh every --interval (default 1s) until interrupted
  --check                    one line and an exit code: 0 protected, 2 not protected yet
                             (starting, syncing, resyncing), 3 degraded, 4 failed over, 5 primary lost,
                             6 unknown stage, 7 not running, 8 split brain, 1 error

pair takeover options (the failover on the secondary's own host, when the supervisor is gone
with the primary's host; refused unless the daemon is a pair's live secondary and its disk's
generation record says consistent, up to date at its generation and not outdated):
  --qmp ADDR                 the secondary daemon on this host (PATH or HOST:PORT)
  --dir DIR                  its data directory (secondary.qcow2 and its record)
  --nbd-socket PATH          serve the recovered disk here (default DIR/disk.sock)
  --nbd-port N, --nbd-host H and on TCP (default: no TCP)
  --lease T|off              the old primary's lease: served only once it has run out (default 500ms)

pair outdate-peer options (on the node of a primary that went on alone: marks the peer's
disk outdated, so that its takeover is refused; the supervisor does it by itself when it can):
  --dir DIR                  this node's data directory (primary.qcow2 and its record)
  --qmp ADDR                 the peer's daemon (PATH or HOST:PORT)
  --peer-dir DIR             the peer's data directory on its node (default: DIR)

pair host options:
  --listen HOST:PORT         the QMP monitor's address (required)
  --tls-dir DIR              certificates; creates objects tls0 (server) and tls1 (client)
  --insecure                 plain TCP (passed to the daemon)
  any other option is passed to 'lockstep daemon' as it is
`;

function parseDuration(text: string, name: string): number {
  const m = /^(\d+(?:\.\d+)?)(ms|s)?$/.exec(text.trim());
  if (!m) throw new Error(`--${name}: expected a duration like 500ms, 1s or 0.25 (seconds), got '${text}'`);
  // a bare number is seconds, as for sleep(1)
  return Number(m[1]) * (m[2] === 'ms' ? 1 : 1000);
}

/** --dirty-extent: the dirty logs' extent-size (granules are 64 KiB). */
function parseDirtyExtent(text: string): number {
  const n = parseSize(text);
  if (n === null || n < 65536 || n > 1 << 30 || (n & (n - 1)) !== 0) {
    throw new Error(`--dirty-extent: expected a power of two from 64K to 1G, got '${text}'`);
  }
  return n;
}

/** --copy-unit: the secondary's copy-before-write unit (PAIR_COPY_UNITS). */
function parseCopyUnit(text: string): number {
  const n = parseSize(text);
  if (n === null || !(PAIR_COPY_UNITS as readonly number[]).includes(n)) {
    throw new Error(`--copy-unit: expected a power of two from 4K to 64K, got '${text}'`);
  }
  return n;
}

/** --resync-rate: bytes per second, with the size suffixes of --size (an optional "/s"). */
function parseRate(text: string): number {
  const t = text.trim().replace(/\/s$/, '');
  const n = parseSize(t);
  if (n === null) throw new Error(`--resync-rate: expected bytes per second like 50M or 1048576, got '${text}'`);
  if (!(n > 0)) throw new Error(`--resync-rate: must be more than 0 bytes per second, got '${text}'`);
  return n;
}

function onOff<T>(text: string | undefined, name: string, f: (on: boolean) => T): T | Record<string, never> {
  if (text === undefined) return {};
  if (text !== 'on' && text !== 'off') throw new Error(`--${name}: expected on or off, got '${text}'`);
  return f(text === 'on');
}

function parseAddress(text: string, name: string): SocketAddress {
  const m = /^([^:/]+):(\d+)$/.exec(text);
  if (m) return { type: 'inet', host: m[1]!, port: Number(m[2]) };
  if (text.includes('/') || text.endsWith('.sock') || text.endsWith('.qmp')) return { type: 'unix', path: text };
  throw new Error(`--${name}: expected a socket path or HOST:PORT, got '${text}'`);
}

function parseHostPort(text: string, name: string): { host: string; port: number } {
  const m = /^\[?([^\]]+?)\]?:(\d+)$/.exec(text);
  const port = m ? Number(m[2]) : NaN;
  if (!m || !Number.isInteger(port) || port < 1 || port > 65535) throw new Error(`--${name}: expected HOST:PORT, got '${text}'`);
  return { host: m[1]!, port };
}

/** `lockstep pair takeover`: the failover on the secondary's own node (src/pair/takeover.ts). */
async function takeoverCommand(v: { qmp?: string; dir?: string; lease?: string; 'nbd-socket'?: string; 'nbd-port'?: string; 'nbd-host'?: string; 'tls-dir'?: string; insecure?: boolean }): Promise<number> {
  let opts: TakeoverOptions;
  try {
    if (!v.qmp) throw new Error('--qmp ADDR is required: the secondary daemon on this node (PATH or HOST:PORT)');
    if (!v.dir) throw new Error("--dir DIR is required: the secondary's data directory on this node");
    const qmp = parseAddress(v.qmp, 'qmp');
    const dir = resolve(v.dir);
    const leaseMs = v.lease === undefined ? PAIR_DEFAULTS.heartbeatTimeoutMs : v.lease === 'off' ? 0 : parseDuration(v.lease, 'lease');
    const nbdPort = v['nbd-port'] !== undefined ? Number(v['nbd-port']) : 0;
    if (!Number.isInteger(nbdPort) || nbdPort < 0 || nbdPort > 65535) throw new Error(`--nbd-port: invalid port '${v['nbd-port']}'`);
    if ('host' in qmp && !v['tls-dir'] && !v.insecure && !isLoopbackAddress(qmp.host)) {
      throw new Error(`--qmp ${v.qmp}: plain TCP to another host: give --tls-dir DIR, or --insecure`);
    }
    const tls = v['tls-dir'] ? { dir: resolve(v['tls-dir']), serverCreds: 'tls0', clientCreds: 'tls1' } : undefined;
    opts = {
      qmp,
      qmpOptions: qmpOptions(tls, qmp),
      dir,
      leaseMs,
      nbdSocket: resolve(v['nbd-socket'] ?? join(dir, 'disk.sock')),
      ...(nbdPort > 0 ? { nbdTcp: { host: v['nbd-host'] ?? PAIR_DEFAULTS.nbdHost, port: nbdPort } } : {}),
    };
  } catch (e) {
    process.stderr.write(`lockstep pair takeover: ${errorMessage(e)}\n`);
    return 1;
  }
  try {
    const r = await takeover({ ...opts, log: (msg) => process.stderr.write(`lockstep pair takeover: ${msg}\n`) });
    process.stdout.write(JSON.stringify(r, null, 2) + '\n');
    return 0;
  } catch (e) {
    process.stderr.write(`lockstep pair takeover: ${errorMessage(e)}\n`);
    return 1;
  }
}

/** `lockstep pair outdate-peer`: marks the peer's record outdated by hand (src/pair/outdate.ts). */
async function outdatePeerCommand(v: { qmp?: string; dir?: string; 'peer-dir'?: string; 'tls-dir'?: string; insecure?: boolean }): Promise<number> {
  try {
    if (!v.dir) throw new Error("--dir DIR is required: this node's data directory (primary.qcow2 and its record)");
    if (!v.qmp) throw new Error("--qmp ADDR is required: the peer's daemon (PATH or HOST:PORT)");
    const qmp = parseAddress(v.qmp, 'qmp');
    if ('host' in qmp && !v['tls-dir'] && !v.insecure && !isLoopbackAddress(qmp.host)) {
      throw new Error(`--qmp ${v.qmp}: plain TCP to another host: give --tls-dir DIR, or --insecure`);
    }
    const tls = v['tls-dir'] ? { dir: resolve(v['tls-dir']), serverCreds: 'tls0', clientCreds: 'tls1' } : undefined;
    const dir = resolve(v.dir);
    const r = await outdatePeerByHand({ dir, qmp, qmpOptions: qmpOptions(tls, qmp), peerDir: v['peer-dir'] ?? dir });
    process.stdout.write(JSON.stringify(r, null, 2) + '\n');
    return 0;
  } catch (e) {
    process.stderr.write(`lockstep pair outdate-peer: ${errorMessage(e)}\n`);
    return 1;
  }
}

const HOST_OPTIONS = {
  listen: { type: 'string' },
  'tls-dir': { type: 'string' },
  insecure: { type: 'boolean' },
} as const;

export interface HostArgs {
  listen?: string;
  tlsDir?: string;
  insecure: boolean;
  /** every other word, in its order: the daemon's options */
  rest: string[];
}

/**
 * `lockstep pair host`'s own options (node:util parseArgs); all others are the daemon's and
 * pass through untouched, in order, with their values.
 */
export function parseHostArgs(argv: string[]): HostArgs {
  // strict: false lets the daemon's options through; their words are copied from argv
  const { tokens } = parseArgs({ args: argv, options: HOST_OPTIONS, strict: false, allowPositionals: true, tokens: true });
  const out: HostArgs = { insecure: false, rest: [] };
  let copied = -1; // a group of short options (-ab) is several tokens of one word
  for (const t of tokens) {
    // --insecure=x is not ours: it goes on to the daemon (which refuses it), as it always did
    if (t.kind === 'option' && Object.hasOwn(HOST_OPTIONS, t.name) && !(t.name === 'insecure' && t.inlineValue)) {
      if (t.name === 'insecure') out.insecure = true;
      else {
        if (t.value === undefined) throw new Error(`${t.rawName} needs a value`);
        if (t.name === 'listen') out.listen = t.value;
        else out.tlsDir = t.value;
      }
      continue;
    }
    if (t.index === copied) continue;
    copied = t.index;
    out.rest.push(argv[t.index]!);
  }
  return out;
}

/** `lockstep pair host`: a daemon ready to be one side of a pair on its own host. */
async function runHost(argv: string[]): Promise<number> {
  const { listen, tlsDir, insecure, rest } = parseHostArgs(argv);
  if (!listen) throw new Error('pair host: --listen HOST:PORT is required');
  const { host, port } = parseHostPort(listen, 'listen');
  if (!tlsDir && !insecure) throw new Error('pair host: give --tls-dir DIR (TLS, both ends verified) or --insecure (plain TCP)');
  const dargs: string[] = [];
  if (tlsDir) {
    const dir = resolve(tlsDir);
    dargs.push(
      '--object', `tls-creds-x509,id=tls0,dir=${dir},endpoint=server,verify-peer=on`,
      '--object', `tls-creds-x509,id=tls1,dir=${dir},endpoint=client`,
    );
  }
  dargs.push(
    '--chardev', `socket,id=pair-mon,host=${host},port=${port},server=on,wait=off${tlsDir ? ',tls-creds=tls0' : ''}`,
    '--monitor', 'chardev=pair-mon',
    ...(insecure ? ['--insecure'] : []),
    ...rest,
  );
  const daemon = await import('./daemon.js');
  return daemon.run(dargs);
}

type Log = (level: 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>) => void;

/** The supervisor's logs: JSON lines as before, or human lines, printed above the live line. */
function makeLog(format: LogFormat, live: LiveLine): Log {
  const color = format === 'human' && process.stderr.isTTY === true && !process.env.NO_COLOR;
  return (level, msg, fields = {}) => {
    const rec = { time: new Date().toISOString(), level, component: 'pair', msg, ...fields };
    live.print((format === 'human' ? formatHuman(rec, color) : JSON.stringify(rec)) + '\n');
  };
}

/**
 * Progress of the initial sync, a resync or a failover's commit: a live line on a terminal;
 * otherwise a log line when it starts, at each further tenth and when it ends.
 */
function makeProgress(live: LiveLine, human: boolean, log: Log): NonNullable<PairOptions['onProgress']> {
  const lastTenth = new Map<string, number>();
  const finished = new Set<string>();
  let lastDraw = 0;
  return (done, total, eta, what = 'initial sync') => {
    const line = progressText(what, done, total, eta);
    if (human && live.enabled) {
      if (done < total) {
        finished.delete(what);
        // at most ten redraws a second
        const now = Date.now();
        if (now - lastDraw < 100) return;
        lastDraw = now;
        live.set(line);
      } else if (!finished.has(what)) {
        // the end stays on the screen, as qemu-img's last progress line does
        finished.add(what);
        live.clear();
        live.print(line + '\n');
      }
      return;
    }
    const tenth = total > 0 ? Math.floor((10 * done) / total) : 10;
    if (lastTenth.get(what) === tenth) return;
    lastTenth.set(what, tenth);
    if (tenth >= 10) lastTenth.delete(what);
    log('info', line, { done, total, 'eta-seconds': eta === null ? null : Math.round(eta * 10) / 10 });
  };
}

/** The pair's one-line state, for the live line of `lockstep pair run` on a terminal. */
function liveStatus(s: PairStatus): string {
  const parts = [s.stage, `checkpoints ${s.checkpoints}`];
  if (s['last-pause-ms'] !== null) parts.push(`last pause ${s['last-pause-ms'].toFixed(2)} ms`);
  parts.push(`copied to hidden ${bytesText(s['hidden-copied-bytes'])}`);
  if (s['heartbeat-age-ms'] !== null) parts.push(`heartbeat ${s['heartbeat-age-ms']} ms`);
  if (s['changed-bytes'] !== undefined) parts.push(`changed since the last checkpoint ${bytesText(s['changed-bytes'])}`);
  return parts.join(' | ');
}

interface StatusFlags {
  json: boolean;
  watch: boolean;
  check: boolean;
  intervalMs: number;
}

/** `lockstep pair resolve --keep SIDE`: ends a split brain (exit codes: RESOLVE_EXIT). */
async function resolveCommand(control: string, keep: string | undefined, json: boolean): Promise<number> {
  if (keep !== 'primary' && keep !== 'secondary') {
    process.stderr.write(`lockstep pair resolve: --keep primary|secondary is required${keep === undefined ? '' : `, got '${keep}'`}\n`);
    return RESOLVE_EXIT.error;
  }
  let r: Awaited<ReturnType<typeof controlRequest>>;
  try {
    // it answers once the kept disk is copied and the pair protected (a save and a copy)
    r = await controlRequest(control, 'resolve', 24 * 3600_000, { keep });
  } catch (e) {
    process.stderr.write(`lockstep pair resolve: ${errorMessage(e)}; no supervisor runs: start the pair (\`lockstep pair\`), which waits in stage split-brain, then resolve\n`);
    return RESOLVE_EXIT['not-running'];
  }
  if (!r.ok) {
    process.stderr.write(`lockstep pair resolve: ${r.error}\n`);
    return r.code === 'ENOSPLIT' ? RESOLVE_EXIT['nothing-to-resolve'] : r.code === 'EREFUSED' ? RESOLVE_EXIT.refused : RESOLVE_EXIT.error;
  }
  const res = r.result as { kept: string; saved: { side: string; image: string; description: string }; copied: { bytes: number; extents: unknown[] } | null; status: { stage: string } };
  if (json) process.stdout.write(JSON.stringify(res, null, 2) + '\n');
  else {
    process.stdout.write(
      `kept the ${res.kept} disk; the ${res.saved.side} disk as it was is saved in ${res.saved.image} (described in ${res.saved.description})\n` +
        `copied ${bytesText(res.copied?.bytes ?? 0)} in ${res.copied?.extents.length ?? 0} extents from the ${res.kept} disk; the pair is ${res.status.stage}\n`,
    );
  }
  return RESOLVE_EXIT.done;
}

/** `lockstep pair status`: human view, JSON, --watch and --check. */
async function statusCommand(control: string, f: StatusFlags): Promise<number> {
  const tty = process.stdout.isTTY === true;
  const human = !f.json && tty;
  const once = async (): Promise<number> => {
    let st: Status;
    try {
      const r = await controlRequest(control, 'status', 10_000);
      if (!r.ok) {
        process.stderr.write(`lockstep pair status: ${r.error}\n`);
        return CHECK_EXIT.error;
      }
      st = r.result as Status;
    } catch (e) {
      if (f.check) process.stdout.write(`not running: ${errorMessage(e)}\n`);
      else process.stderr.write(`lockstep pair status: ${errorMessage(e)}\n`);
      return f.check ? CHECK_EXIT['not-running'] : CHECK_EXIT.error;
    }
    if (f.check) process.stdout.write(checkLine(st));
    else if (human) process.stdout.write((f.watch ? '\x1b[H\x1b[2J' : '') + renderStatus(st));
    else process.stdout.write(f.watch ? JSON.stringify(st) + '\n' : JSON.stringify(st, null, 2) + '\n');
    return f.check ? checkCode(st) : 0;
  };
  if (!f.watch) return once();
  // until interrupted: the last answer's code is the exit code
  let code = 0;
  let stop = false;
  const onSig = () => {
    stop = true;
  };
  process.once('SIGINT', onSig);
  process.once('SIGTERM', onSig);
  while (!stop) {
    code = await once();
    for (let waited = 0; waited < f.intervalMs && !stop; waited += 50) await new Promise((r) => setTimeout(r, Math.min(50, f.intervalMs - waited)));
  }
  return code;
}

export async function run(argv: string[]): Promise<number> {
  if (argv[0] === 'host') {
    try {
      return await runHost(argv.slice(1));
    } catch (e) {
      process.stderr.write(`lockstep ${errorMessage(e)}\n`);
      return 1;
    }
  }
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        'data-dir': { type: 'string' },
        size: { type: 'string' },
        'checkpoint-interval': { type: 'string' },
        'heartbeat-interval': { type: 'string' },
        'heartbeat-timeout': { type: 'string' },
        failover: { type: 'string' },
        'flush-commit': { type: 'string' },
        'resync-rate': { type: 'string' },
        'dirty-extent': { type: 'string' },
        'copy-unit': { type: 'string' },
        reprotect: { type: 'string' },
        lease: { type: 'string' },
        'on-lease-expiry': { type: 'string' },
        'nbd-socket': { type: 'string' },
        'nbd-port': { type: 'string' },
        metrics: { type: 'string' },
        'primary-qmp': { type: 'string' },
        'secondary-qmp': { type: 'string' },
        'primary-dir': { type: 'string' },
        'secondary-dir': { type: 'string' },
        'secondary-nbd': { type: 'string' },
        'nbd-host': { type: 'string' },
        'tls-dir': { type: 'string' },
        'tls-creds': { type: 'string' },
        'tls-client-creds': { type: 'string' },
        insecure: { type: 'boolean' },
        control: { type: 'string' },
        'force-current': { type: 'string' },
        keep: { type: 'string' },
        qmp: { type: 'string' },
        dir: { type: 'string' },
        'peer-dir': { type: 'string' },

        'log-format': { type: 'string' },
        json: { type: 'boolean' },
        watch: { type: 'boolean' },
        interval: { type: 'string' },
        check: { type: 'boolean' },
        help: { type: 'boolean', short: 'h' },
      },
    });
  } catch (e) {
    process.stderr.write(`lockstep pair: ${errorMessage(e)}\n`);
    return 1;
  }
  const v = parsed.values;
  if (v.help) {
    process.stdout.write(HELP);
    return 0;
  }
  const dataDir = resolve(v['data-dir'] ?? 'lockstep-data');
  const control = v.control ?? join(dataDir, 'pair.sock');
  const sub = parsed.positionals[0] ?? 'run';

  if (v.keep !== undefined && sub !== 'resolve') {
    process.stderr.write(`lockstep pair ${sub}: --keep is an option of 'lockstep pair resolve'\n`);
    return 1;
  }
  if (sub === 'resolve') return resolveCommand(control, v.keep, v.json === true || process.stdout.isTTY !== true);
  if ((v.json || v.watch || v.check || v.interval) && sub !== 'status') {
    process.stderr.write(`lockstep pair ${sub}: --json, --watch, --interval and --check are options of 'lockstep pair status'\n`);
    return 1;
  }
  if ((v.qmp !== undefined || v.dir !== undefined) && sub !== 'takeover' && sub !== 'outdate-peer') {
    process.stderr.write(`lockstep pair ${sub}: --qmp and --dir are options of 'lockstep pair takeover'\n`);
    return 1;
  }
  if (v['peer-dir'] !== undefined && sub !== 'outdate-peer') {
    process.stderr.write(`lockstep pair ${sub}: --peer-dir is an option of 'lockstep pair outdate-peer'\n`);
    return 1;
  }
  if (sub === 'takeover') return takeoverCommand(v);
  if (sub === 'outdate-peer') return outdatePeerCommand(v);
  if (sub === 'status') {
    let intervalMs = 1000;
    try {
      if (v.interval !== undefined) intervalMs = parseDuration(v.interval, 'interval');
      if (intervalMs <= 0) throw new Error(`--interval: must be more than 0, got '${v.interval}'`);
    } catch (e) {
      process.stderr.write(`lockstep pair status: ${errorMessage(e)}\n`);
      return 1;
    }
    return statusCommand(control, { json: v.json === true, watch: v.watch === true, check: v.check === true, intervalMs });
  }
  if (sub === 'checkpoint' || sub === 'failover' || sub === 'reprotect') {
    try {
      // a re-protection answers once the pair is protected again (a resync may take long)
      const r = await controlRequest(control, sub, sub === 'reprotect' ? 24 * 3600_000 : undefined);
      if (!r.ok) {
        process.stderr.write(`lockstep pair ${sub}: ${r.error}\n`);
        return 1;
      }
      process.stdout.write(JSON.stringify(r.result, null, 2) + '\n');
      return 0;
    } catch (e) {
      process.stderr.write(`lockstep pair ${sub}: ${errorMessage(e)}\n`);
      return 1;
    }
  }
  if (sub !== 'run') {
    process.stderr.write(`lockstep pair: unknown command '${sub}'\n${HELP}`);
    return 1;
  }

  let format: LogFormat;
  try {
    format = v['log-format'] !== undefined ? parseLogFormat(v['log-format']) : defaultLogFormat(process.stderr);
  } catch (e) {
    process.stderr.write(`lockstep pair: ${errorMessage(e)}\n`);
    return 1;
  }
  const live = new LiveLine(process.stderr);
  const log = makeLog(format, live);
  // the live line only next to human logs: JSON lines are for programs
  const human = format === 'human' && live.enabled;

  let opts: PairOptions;
  try {
    const size = v.size !== undefined ? parseSize(v.size) : PAIR_DEFAULTS.size;
    if (size === null || size <= 0) throw new Error(`--size: invalid size '${v.size}'`);
    const failover = v.failover ?? PAIR_DEFAULTS.failover;
    if (failover !== 'auto' && failover !== 'manual') throw new Error(`--failover: expected auto or manual, got '${failover}'`);
    const nbdPort = v['nbd-port'] !== undefined ? Number(v['nbd-port']) : PAIR_DEFAULTS.nbdPort;
    const primaryQmp = v['primary-qmp'] ? parseAddress(v['primary-qmp'], 'primary-qmp') : undefined;
    const secondaryQmp = v['secondary-qmp'] ? parseAddress(v['secondary-qmp'], 'secondary-qmp') : undefined;
    // with a daemon on another host, its Unix socket path is on that host: the default
    // user socket then lives in each side's own directory (chosen by the supervisor)
    const remote = primaryQmp !== undefined || secondaryQmp !== undefined;
    if ((v['tls-creds'] || v['tls-client-creds']) && !v['tls-dir']) throw new Error('--tls-creds and --tls-client-creds need --tls-dir');
    if (!Number.isInteger(nbdPort) || nbdPort < 0 || nbdPort > 65535) throw new Error(`--nbd-port: invalid port '${v['nbd-port']}'`);
    const forceCurrent = v['force-current'];
    if (forceCurrent !== undefined && forceCurrent !== 'primary' && forceCurrent !== 'secondary') {
      throw new Error(`--force-current: expected primary or secondary, got '${forceCurrent}'`);
    }
    if (v['on-lease-expiry'] !== undefined && v.lease === 'off') throw new Error('--on-lease-expiry: there is no lease with --lease off');
    opts = {
      dataDir,
      control,
      size,
      checkpointIntervalMs: v['checkpoint-interval'] ? parseDuration(v['checkpoint-interval'], 'checkpoint-interval') : PAIR_DEFAULTS.checkpointIntervalMs,
      heartbeatIntervalMs: v['heartbeat-interval'] ? parseDuration(v['heartbeat-interval'], 'heartbeat-interval') : PAIR_DEFAULTS.heartbeatIntervalMs,
      heartbeatTimeoutMs: v['heartbeat-timeout'] ? parseDuration(v['heartbeat-timeout'], 'heartbeat-timeout') : PAIR_DEFAULTS.heartbeatTimeoutMs,
      failover,
      ...(v['nbd-socket'] ? { nbdSocket: resolve(v['nbd-socket']) } : remote ? {} : { nbdSocket: join(dataDir, 'disk.sock') }),
      ...(nbdPort > 0 ? { nbdHost: v['nbd-host'] ?? PAIR_DEFAULTS.nbdHost, nbdPort } : {}),
      ...(primaryQmp ? { primaryQmp } : {}),
      ...(secondaryQmp ? { secondaryQmp } : {}),
      ...(v['primary-dir'] ? { primaryDir: v['primary-dir'] } : {}),
      ...(v['secondary-dir'] ? { secondaryDir: v['secondary-dir'] } : {}),
      ...(v['secondary-nbd'] ? { secondaryNbd: parseHostPort(v['secondary-nbd'], 'secondary-nbd') } : {}),
      ...(v['tls-dir']
        ? { tls: { dir: resolve(v['tls-dir']), serverCreds: v['tls-creds'] ?? 'tls0', clientCreds: v['tls-client-creds'] ?? 'tls1' } }
        : {}),
      ...(v.insecure ? { insecure: true } : {}),
      ...(forceCurrent ? { forceCurrent } : {}),
      ...onOff(v['flush-commit'], 'flush-commit', (b) => ({ flushCommit: b })),
      ...onOff(v.reprotect, 'reprotect', (b) => ({ reprotect: b })),
      ...(v['resync-rate'] === undefined ? {} : { resyncRate: parseRate(v['resync-rate']) }),
      ...(v['dirty-extent'] === undefined ? {} : { dirtyExtentBytes: parseDirtyExtent(v['dirty-extent']) }),
      ...(v['copy-unit'] === undefined ? {} : { copyUnit: parseCopyUnit(v['copy-unit']) }),
      ...(v.lease === undefined ? {} : { leaseMs: v.lease === 'off' ? 0 : parseDuration(v.lease, 'lease') }),
      ...(v['on-lease-expiry'] === undefined ? {} : { onLeaseExpiry: parseLeaseExpiry(v['on-lease-expiry']) }),
      log,
      onProgress: makeProgress(live, human, log),
    };
  } catch (e) {
    process.stderr.write(`lockstep pair: ${errorMessage(e)}\n`);
    return 1;
  }
  let metricsAddr: { host: string; port: number } | undefined;
  if (v.metrics) {
    try {
      metricsAddr = parseHostPort(v.metrics, 'metrics');
    } catch (e) {
      process.stderr.write(`lockstep pair: ${errorMessage(e)}\n`);
      return 1;
    }
  }

  const notifySocket = takeNotifySocket();
  const sup = new PairSupervisor(opts);
  const shutdown = async (): Promise<void> => {
    live.clear();
    await sup.stop();
    // a clean stop leaves no control socket behind (a stale one is what a crash leaves)
    rmSync(control, { force: true });
    process.exit(0);
  };
  process.once('SIGINT', () => void shutdown());
  process.once('SIGTERM', () => void shutdown());
  try {
    // before anything starts: a live supervisor on this control socket is refused, a dead
    // one's socket is replaced (its daemons are adopted by start())
    if ((await claimControl(control)) === 'stale-removed') log('warn', `removed a stale control socket ${control} (its supervisor is gone)`);
  } catch (e) {
    log('error', `the pair could not start: ${errorMessage(e)}`);
    return 1;
  }
  try {
    await sup.start();
  } catch (e) {
    live.clear();
    log('error', `the pair could not start: ${errorMessage(e)}`);
    await sup.stop();
    return 1;
  }
  live.clear();
  const ctl = await serveControl(sup, control);
  if (metricsAddr) {
    const server = createServer((req, res) => {
      if (req.url !== '/metrics') {
        res.writeHead(404).end();
        return;
      }
      res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4' }).end(sup.metrics.render(sup.status()));
    });
    try {
      await new Promise<void>((ok, fail) => {
        server.once('error', fail);
        server.listen(metricsAddr.port, metricsAddr.host, () => ok());
      });
    } catch (e) {
      log('error', `--metrics: cannot listen on ${v.metrics}: ${errorMessage(e)}`);
    }
  }
  const serving = sup.status().serving;
  if (sup.stage === 'split-brain') {
    const sb = sup.splitBrain!;
    live.print(
      `\nlockstep pair is waiting in stage split-brain (data in ${dataDir}): nothing is served or copied.\n` +
        `${sb.reason}.\nChanged since the common generation: primary ${bytesText(sb['changed-bytes'].primary)}, secondary ${bytesText(sb['changed-bytes'].secondary)}.\n` +
        `Keep one disk (the other is saved whole first, then overwritten where they differ):\n${sb.commands.map((c) => `  ${c}`).join('\n')}\n`,
      process.stdout,
    );
  } else {
    live.print(
      `\nlockstep pair is running (data in ${dataDir}).\nThe replicated disk is served at:\n${serving.map((s) => `  ${s}`).join('\n')}\n` +
        `Attach with, for example:\n` +
        `  qemu-io -f raw '${serving[0]}' -c 'write -P 0x5a 0 1M'\n` +
        `  nbdcopy ./some-image.raw '${serving[0]}'\n` +
        `  qemu-system-x86_64 -drive file=${serving[0]},format=raw,if=virtio ...\n` +
        `Status: lockstep pair status --control ${control}\n`,
      process.stdout,
    );
  }
  notifyReady(`${sup.stage}: serving ${serving.join(', ')}`, notifySocket);
  if (human) {
    const draw = () => live.set(liveStatus(sup.status()));
    draw();
    setInterval(draw, 1000).unref();
  }
  sup.on('failed-over', (e: { ms: number; serving: string[] }) => {
    live.print(`FAILED OVER in ${e.ms} ms: the recovered disk is served at ${e.serving.join(', ')}\n`, process.stdout);
  });
  await new Promise<void>((resolveRun) => ctl.once('close', () => resolveRun()));
  return 0;
}
