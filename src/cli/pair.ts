// `lockstep pair`: run and supervise a primary/secondary replication pair, or talk to a
// running supervisor (`status`, `checkpoint`, `failover`).

import { parseArgs } from 'node:util';
import { createServer } from 'node:http';
import { resolve, join } from 'node:path';
import { parseSize } from '../block/options.js';
import { errorMessage } from '../errors.js';
import { PAIR_DEFAULTS, PairSupervisor, type PairOptions } from '../pair/supervisor.js';
import { controlRequest, serveControl } from '../pair/control.js';
import type { QmpClientAddress } from '../qmp/client.js';

const HELP = `Usage: lockstep pair [run] [options]
       lockstep pair status|checkpoint|failover [--data-dir DIR | --control PATH]
       lockstep pair host --listen HOST:PORT (--tls-dir DIR | --insecure) [daemon options]

Runs a primary and a secondary lockstep daemon on this machine (or drives running ones),
copies the disk once, starts replication, serves the primary's disk over NBD, takes a
consistent checkpoint every interval and fails over to the secondary when the primary dies.

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

function onOff<T>(text: string | undefined, name: string, f: (on: boolean) => T): T | Record<string, never> {
  if (text === undefined) return {};
  if (text !== 'on' && text !== 'off') throw new Error(`--${name}: expected on or off, got '${text}'`);
  return f(text === 'on');
}

function parseAddress(text: string, name: string): QmpClientAddress {
  const m = /^([^:/]+):(\d+)$/.exec(text);
  if (m) return { host: m[1]!, port: Number(m[2]) };
  if (text.includes('/') || text.endsWith('.sock') || text.endsWith('.qmp')) return { path: text };
  throw new Error(`--${name}: expected a socket path or HOST:PORT, got '${text}'`);
}

function parseHostPort(text: string, name: string): { host: string; port: number } {
  const m = /^\[?([^\]]+?)\]?:(\d+)$/.exec(text);
  const port = m ? Number(m[2]) : NaN;
  if (!m || !Number.isInteger(port) || port < 1 || port > 65535) throw new Error(`--${name}: expected HOST:PORT, got '${text}'`);
  return { host: m[1]!, port };
}

/** `lockstep pair host`: a daemon ready to be one side of a pair on its own host. */
async function runHost(argv: string[]): Promise<number> {
  const rest: string[] = [];
  let listen: string | undefined;
  let tlsDir: string | undefined;
  let insecure = false;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const value = (): string => {
      const v = argv[++i];
      if (v === undefined) throw new Error(`${a} needs a value`);
      return v;
    };
    if (a === '--listen') listen = value();
    else if (a.startsWith('--listen=')) listen = a.slice(9);
    else if (a === '--tls-dir') tlsDir = value();
    else if (a.startsWith('--tls-dir=')) tlsDir = a.slice(10);
    else if (a === '--insecure') insecure = true;
    else rest.push(a);
  }
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

function log(level: string, msg: string, fields: Record<string, unknown> = {}): void {
  process.stderr.write(JSON.stringify({ time: new Date().toISOString(), level, component: 'pair', msg, ...fields }) + '\n');
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
        lease: { type: 'string' },
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

  if (sub === 'status' || sub === 'checkpoint' || sub === 'failover') {
    try {
      const r = await controlRequest(control, sub);
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
    opts = {
      dataDir,
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
      ...(v.lease === undefined ? {} : { leaseMs: v.lease === 'off' ? 0 : parseDuration(v.lease, 'lease') }),
      log,
      onProgress: (done, total, eta) => {
        const pct = total ? ((100 * done) / total).toFixed(1) : '100';
        const line = `initial sync: ${pct}% (${(done / 2 ** 20).toFixed(0)}/${(total / 2 ** 20).toFixed(0)} MiB)${eta !== null ? `, ETA ${eta.toFixed(1)} s` : ''}`;
        if (process.stdout.isTTY) process.stdout.write(`\r${line}\x1b[K`);
        else log('info', line);
      },
    };
  } catch (e) {
    process.stderr.write(`lockstep pair: ${errorMessage(e)}\n`);
    return 1;
  }

  const sup = new PairSupervisor(opts);
  const shutdown = async (): Promise<void> => {
    await sup.stop();
    process.exit(0);
  };
  process.once('SIGINT', () => void shutdown());
  process.once('SIGTERM', () => void shutdown());
  try {
    await sup.start();
  } catch (e) {
    log('error', `the pair could not start: ${errorMessage(e)}`);
    await sup.stop();
    return 1;
  }
  const ctl = await serveControl(sup, control);
  if (v.metrics) {
    const m = /^(.+):(\d+)$/.exec(v.metrics);
    if (!m) {
      log('error', `--metrics: expected HOST:PORT, got '${v.metrics}'`);
    } else {
      createServer((req, res) => {
        if (req.url !== '/metrics') {
          res.writeHead(404).end();
          return;
        }
        res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4' }).end(sup.metrics.render(sup.status().role, sup.stage));
      }).listen(Number(m[2]), m[1]);
    }
  }
  const serving = sup.status().serving;
  process.stdout.write(
    `\nlockstep pair is running (data in ${dataDir}).\nThe replicated disk is served at:\n${serving.map((s) => `  ${s}`).join('\n')}\n` +
      `Attach with, for example:\n` +
      `  qemu-io -f raw '${serving[0]}' -c 'write -P 0x5a 0 1M'\n` +
      `  nbdcopy ./some-image.raw '${serving[0]}'\n` +
      `  qemu-system-x86_64 -drive file=${serving[0]},format=raw,if=virtio ...\n` +
      `Status: lockstep pair status --control ${control}\n`,
  );
  if (process.stdout.isTTY) {
    setInterval(() => {
      const s = sup.status();
      process.stdout.write(
        `\r${s.stage} | checkpoints ${s.checkpoints} | last pause ${s['last-pause-ms']?.toFixed(2) ?? '-'} ms | forwarded ${(s['bytes-forwarded'] / 2 ** 20).toFixed(1)} MiB | dirty ${s['dirty-clusters']} | heartbeat ${s['heartbeat-age-ms'] ?? '-'} ms` +
          (s['changed-bytes'] !== undefined ? ` | changed since the last checkpoint ${(s['changed-bytes'] / 2 ** 20).toFixed(1)} MiB` : '') +
          '\x1b[K',
      );
    }, 1000).unref();
  }
  sup.on('failed-over', (e: { ms: number; serving: string[] }) => {
    process.stdout.write(`\nFAILED OVER in ${e.ms} ms: the recovered disk is served at ${e.serving.join(', ')}\n`);
  });
  await new Promise<void>((resolveRun) => ctl.once('close', () => resolveRun()));
  return 0;
}
