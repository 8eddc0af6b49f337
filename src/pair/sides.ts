// The pair's two sides as the supervisor sees them: a `lockstep daemon` started here (one
// host) or reached at its QMP address (two hosts), the QMP calls that give up when a side
// stays silent, and the transport rule (TLS, or plain TCP only to loopback or with insecure).

import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, openSync, readFileSync, rmSync } from 'node:fs';
import { isIP } from 'node:net';
import { lookup } from 'node:dns/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { QmpClient, type QmpClientOptions } from '../qmp/client.js';
import { errorMessage } from '../errors.js';
import type { SideLayout } from './setup.js';
import { waitGone } from './adopt.js';
import type { SocketAddress } from '../util/socket-address.js';

const LOCKSTEP_BIN = fileURLToPath(new URL('../../../bin/lockstep', import.meta.url));

export type SideName = 'primary' | 'secondary';

export interface Side {
  name: SideName;
  qmp: QmpClient;
  child: ChildProcess | null;
  /** a daemon started by an earlier supervisor on this host and adopted (adopt.ts) */
  pid?: number;
  layout: SideLayout;
  lastAnswer: number;
  alive: boolean;
}

export interface PairTls {
  /** the supervisor's own credentials: ca-cert.pem, client-cert.pem, client-key.pem */
  dir: string;
  /** id of the tls-creds-x509 object (endpoint=server) on the secondary daemon, for its NBD server */
  serverCreds: string;
  /** id of the tls-creds-x509 object (endpoint=client) on the primary daemon, for forwarding */
  clientCreds: string;
}

/** A QMP command that gives up when the side stays silent (a cut link never answers). */
export function callSide(side: Side, command: string, args: Record<string, unknown> | undefined, timeoutMs: number): Promise<unknown> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`the ${side.name} did not answer ${command} within ${timeoutMs} ms`)), timeoutMs);
  });
  return Promise.race([side.qmp.execute(command, args), timeout]).finally(() => clearTimeout(timer));
}

export function describeAddress(a: SocketAddress): string {
  return a.type === 'unix' ? a.path : `${a.host}:${a.port}`;
}

/** A literal address in 127.0.0.0/8 or ::1 (also as IPv4-mapped IPv6); a name is not one. */
export function isLoopbackAddress(addr: string): boolean {
  const a = addr.replace(/^\[|\]$/g, '').replace(/%.*$/, '');
  const v = isIP(a);
  if (v === 4) return Number(a.split('.')[0]) === 127;
  if (v === 6) {
    // the URL parser writes every IPv6 address in its one canonical form
    const canon = new URL(`http://[${a}]/`).hostname;
    if (canon === '[::1]') return true;
    const mapped = /^\[::ffff:([0-9a-f]{1,4}):[0-9a-f]{1,4}\]$/.exec(canon);
    return mapped !== null && parseInt(mapped[1]!, 16) >> 8 === 127;
  }
  return false;
}

type Lookup = (host: string) => Promise<string[]>;
const systemLookup: Lookup = async (host) => (await lookup(host, { all: true, verbatim: true })).map((x) => x.address);

/** Loopback by parsed address: a literal is checked as it is; a name is resolved first and
 *  every address it resolves to must be loopback (never decided by its spelling). */
export async function isLoopback(host: string, resolve: Lookup = systemLookup): Promise<boolean> {
  const h = host.replace(/^\[|\]$/g, '');
  if (isIP(h.replace(/%.*$/, ''))) return isLoopbackAddress(h);
  let addrs: string[];
  try {
    addrs = await resolve(h);
  } catch {
    return false;
  }
  return addrs.length > 0 && addrs.every(isLoopbackAddress);
}

/** Refuses plain TCP to another host unless `insecure` (before anything is started). */
export async function checkTransport(
  o: { tls?: PairTls | undefined; insecure?: boolean | undefined; primaryQmp?: SocketAddress | undefined; secondaryQmp?: SocketAddress | undefined },
  forward: SocketAddress,
  resolve?: Lookup,
): Promise<void> {
  if (o.tls || o.insecure) return;
  const hosts: Array<[string, string]> = [];
  for (const [what, a] of [['primary QMP', o.primaryQmp], ['secondary QMP', o.secondaryQmp]] as const) {
    if (a && 'host' in a) hosts.push([what, a.host]);
  }
  if (forward.type === 'inet') hosts.push(['the forwarding NBD address', forward.host]);
  for (const [what, host] of hosts) {
    if (!(await isLoopback(host, resolve))) {
      throw new Error(`${what} ${host} is not a loopback address: give TLS credentials (--tls-dir) or allow plain TCP with --insecure`);
    }
  }
}

export function qmpOptions(tls: PairTls | undefined, addr: SocketAddress): QmpClientOptions {
  if (!tls || !('host' in addr)) return {};
  const read = (f: string): Buffer => {
    try {
      return readFileSync(join(tls.dir, f));
    } catch (e) {
      throw new Error(`TLS credentials: cannot read ${join(tls.dir, f)}: ${errorMessage(e)}`);
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

/** Attaches to a running daemon, or starts one on this host with its QMP socket in `sockDir`. */
export async function launchSide(
  name: SideName,
  attach: SocketAddress | undefined,
  layout: SideLayout,
  sockDir: string,
  tls: PairTls | undefined,
): Promise<Side> {
  if (attach) {
    let qmp: QmpClient;
    try {
      qmp = await QmpClient.open(attach, qmpOptions(tls, attach));
    } catch (e) {
      throw new Error(`cannot reach the ${name} daemon's QMP at ${describeAddress(attach)}: ${errorMessage(e)}`);
    }
    return { name, qmp, child: null, layout, lastAnswer: Date.now(), alive: true };
  }
  const sock = join(sockDir, `${name}.qmp`);
  rmSync(sock, { force: true });
  // The daemon outlives this supervisor (adopt.ts): its own session, so that a signal to the
  // supervisor's process group (Ctrl-C, a closed terminal) does not reach it, and its log in
  // a file, so that it never writes to a pipe whose reader is gone.
  const logPath = daemonLogPath(sockDir, name);
  const logFd = openSync(logPath, 'a', 0o644);
  let child: ChildProcess;
  try {
    child = spawn(
      process.execPath,
      [LOCKSTEP_BIN, 'daemon', '--chardev', `socket,id=mon0,path=${sock},server=on,wait=off`, '--monitor', 'chardev=mon0'],
      { stdio: ['ignore', 'ignore', logFd], detached: true },
    );
  } finally {
    closeSync(logFd);
  }
  const stderr = (): string => {
    try {
      return readFileSync(logPath, 'utf8').slice(-8192).trim();
    } catch {
      return '';
    }
  };
  for (let i = 0; !existsSync(sock); i++) {
    if (child.exitCode !== null || i > 200) throw new Error(`the ${name} daemon did not start: ${stderr()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  // the socket file appears at bind(), a moment before listen(): refused until then
  for (let i = 0; ; i++) {
    try {
      const qmp = await QmpClient.open({ type: 'unix', path: sock });
      return { name, qmp, child, layout, lastAnswer: Date.now(), alive: true };
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ECONNREFUSED' || child.exitCode !== null || i > 100) throw e;
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}

/** Where a daemon started here logs (its stderr), beside its QMP socket. */
export function daemonLogPath(sockDir: string, name: SideName): string {
  return join(sockDir, `${name}-daemon.log`);
}

/** An attached daemon must be fresh: a pair half set up (say, by a supervisor that died)
 *  would otherwise fail later with a bare "Duplicate nodes". */
export async function checkFresh(side: Side, addr: SocketAddress, timeoutMs: number): Promise<void> {
  const nodes = (await callSide(side, 'query-named-block-nodes', { flat: true }, timeoutMs)) as Array<{ 'node-name': string }>;
  if (nodes.length === 0) return;
  // the names a user gave first; '#blockNNN' are automatic names of inner nodes
  const all = nodes.map((n) => n['node-name']);
  const named = all.filter((n) => !n.startsWith('#'));
  const shown = (named.length > 0 ? named : all).slice(0, 5);
  throw new Error(
    `the ${side.name} daemon at ${describeAddress(addr)} already has block nodes (${shown.join(', ')}${all.length > shown.length ? ', ...' : ''}): ` +
      'lockstep pair sets up freshly started daemons; restart it (lockstep pair host) and run again',
  );
}

/** Ends a daemon started here: quit over QMP, then SIGKILL if it has not exited within 5 s. */
export async function stopSide(side: Side, timeoutMs: number): Promise<void> {
  // daemons started here (or adopted) end with the supervisor; attached ones are the operator's
  if (side.alive && (side.child || side.pid)) await callSide(side, 'quit', undefined, timeoutMs).catch(() => {});
  side.qmp.close();
  if (side.pid !== undefined) await waitGone(side.pid, 5000);
  const child = side.child;
  // a process killed by a signal has exitCode null and signalCode set
  if (child && child.exitCode === null && child.signalCode === null) {
    await new Promise<void>((r) => {
      const t = setTimeout(() => {
        child.kill('SIGKILL');
        r();
      }, 5000);
      child.once('exit', () => {
        clearTimeout(t);
        r();
      });
    });
  }
}
