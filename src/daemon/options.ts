// `lockstep daemon` options, spelled as qemu-storage-daemon's. Every option value is parsed
// and validated here (keyval or JSON, typed by the same schemas as the QMP commands), so
// that start-up only acts on well-formed items, in command-line order.

import { InvalidArgumentError } from '../errors.js';
import { parseOptionString } from '../util/keyval.js';
import { BLOCK_EXPORT_ADD, NBD_SERVER_OPTIONS } from '../qmp/schema/nbd.js';
import { OBJECT_ADD } from '../qmp/schema/misc.js';
import { checkValue, coerceStrings, enumOf, validateArguments, type Fields } from '../qmp/schema/types.js';
import { LOG_FORMATS, LOG_LEVELS, type LogFormat, type LogLevel } from '../util/log.js';
import type { SocketAddress } from '../util/socket-address.js';

export type DaemonItem =
  | { kind: 'blockdev'; options: Record<string, unknown>; keyval: boolean }
  /** extraAddrs: more listeners for the same server (--default listens on two) */
  | { kind: 'nbd-server'; options: Record<string, unknown>; extraAddrs?: SocketAddress[] }
  | { kind: 'export'; options: Record<string, unknown> }
  | { kind: 'object'; options: Record<string, unknown> }
  | { kind: 'monitor'; options: Record<string, unknown> };

export interface ChardevOptions {
  id: string;
  path?: string;
  host?: string;
  port?: string;
  server: boolean;
  wait: boolean;
  tlsCreds?: string;
}

export interface DaemonOptions {
  /** blockdevs, objects, NBD server, exports and monitors in command-line order */
  items: DaemonItem[];
  chardevs: Map<string, ChardevOptions>;
  pidfile?: string;
  daemonize: boolean;
  logLevel: LogLevel;
  /** --log-format; unset: human on a terminal, json otherwise */
  logFormat?: LogFormat;
  insecure: boolean;
  /** --x-monitor-idle-timeout, in seconds (unset: the QMP server's default, 30 s) */
  monitorIdleTimeout?: number;
  /** --default: the embedded quick-start configuration */
  defaults: boolean;
  /** --data-dir for --default (./lockstep-data) */
  dataDir: string;
  help: boolean;
}

export const DAEMON_USAGE = `Usage: lockstep daemon [options]
Serve block nodes over NBD with a QMP monitor (qemu-storage-daemon's options).

  --blockdev [driver=]DRIVER[,node-name=N][,prop=value][,...] | JSON
                         add a block node (as blockdev-add)
  --nbd-server addr.type=inet,addr.host=H,addr.port=P[,tls-creds=ID][,max-connections=N][,x-idle-timeout=S]
  --nbd-server addr.type=unix,addr.path=PATH[,tls-creds=ID][,max-connections=N][,x-idle-timeout=S]
                         start the NBD server
  --export [type=]nbd,id=ID,node-name=NODE[,name=NAME][,writable=on|off][,description=TEXT]
                         export a node over NBD
  --chardev socket,id=ID,path=PATH,server=on,wait=off
  --chardev socket,id=ID,host=H,port=P,server=on,wait=off[,tls-creds=ID]
                         a socket for a monitor
  --monitor [chardev=]ID serve QMP on a chardev
  --object tls-creds-x509,id=ID,dir=DIR,endpoint=server|client[,verify-peer=on|off]
  --object secret,id=ID,data=TEXT
                         create a user object (as object-add)
  --pidfile PATH         write the daemon's pid to PATH
  --daemonize            detach once started (the parent exits 0 when ready)
  --log-level LEVEL      debug, info (default), warn, error or silent; logs go to stderr
  --log-format FORMAT    json (one JSON object per line) or human (short lines); default:
                         human when stderr is a terminal, json otherwise
  --insecure             allow a plain TCP monitor and writable NBD exports on non-loopback
                         addresses without TLS
  --default              run a ready-made daemon: a 1 GiB image under --data-dir, exported on
                         a Unix socket and 127.0.0.1:10809, QMP on a Unix socket
  --data-dir DIR         where --default keeps its files (default ./lockstep-data)
  --x-monitor-idle-timeout S
                         when 64 monitor clients are connected, a new one replaces the client
                         idle longest if idle at least S seconds (default 30; 0: never)
  -h, --help             this help

SIGTERM and SIGINT shut down gracefully (drain, flush, close) and exit 0.
`;

const CHARDEV: Fields = {
  backend: enumOf('socket'),
  id: 'str',
  '*path': 'str',
  '*host': 'str',
  '*port': 'str',
  '*server': 'bool',
  '*wait': 'bool',
  '*tls-creds': 'str',
  '*tls-authz': 'str',
  '*ipv4': 'bool',
  '*ipv6': 'bool',
  '*nodelay': 'bool',
  '*telnet': 'bool',
  '*abstract': 'bool',
  '*tight': 'bool',
  '*reconnect': 'int',
  '*logfile': 'str',
  '*logappend': 'bool',
};

const MONITOR: Fields = { chardev: 'str', '*mode': enumOf('control', 'readline'), '*pretty': 'bool', '*id': 'str' };

function parseItem(option: string, text: string, implied: string | undefined, schema: Fields | Parameters<typeof checkValue>[0]): Record<string, unknown> {
  try {
    const parsed = parseOptionString(text, implied !== undefined ? { impliedKey: implied } : {});
    const typed = (parsed.keyval ? coerceStrings(schema, parsed.dict) : parsed.dict) as Record<string, unknown>;
    validateArguments(schema, typed);
    return typed;
  } catch (e) {
    throw new InvalidArgumentError(`${option}: ${(e as Error).message}`);
  }
}

/** Parses the daemon's argv (without the subcommand). Throws InvalidArgumentError. */
export function parseDaemonArgs(argv: string[]): DaemonOptions {
  const o: DaemonOptions = {
    items: [],
    chardevs: new Map(),
    daemonize: false,
    logLevel: 'info',
    insecure: false,
    defaults: false,
    dataDir: 'lockstep-data',
    help: false,
  };
  const withValue = new Set(['--blockdev', '--nbd-server', '--export', '--chardev', '--monitor', '--object', '--pidfile', '--log-level', '--log-format', '--data-dir', '--x-monitor-idle-timeout']);
  for (let i = 0; i < argv.length; i++) {
    let arg = argv[i]!;
    let value: string | undefined;
    const eq = arg.indexOf('=');
    if (arg.startsWith('--') && eq > 0 && withValue.has(arg.slice(0, eq))) {
      value = arg.slice(eq + 1);
      arg = arg.slice(0, eq);
    } else if (withValue.has(arg)) {
      value = argv[++i];
      if (value === undefined) throw new InvalidArgumentError(`option '${arg}' needs an argument`);
    }
    switch (arg) {
      case '--blockdev': {
        const parsed = parseOptionString(value!);
        o.items.push({ kind: 'blockdev', options: parsed.dict, keyval: parsed.keyval });
        break;
      }
      case '--nbd-server':
        o.items.push({ kind: 'nbd-server', options: parseItem('--nbd-server', value!, undefined, NBD_SERVER_OPTIONS) });
        break;
      case '--export':
        o.items.push({ kind: 'export', options: parseItem('--export', value!, 'type', BLOCK_EXPORT_ADD) });
        break;
      case '--object':
        o.items.push({ kind: 'object', options: parseItem('--object', value!, 'qom-type', OBJECT_ADD) });
        break;
      case '--monitor':
        o.items.push({ kind: 'monitor', options: parseItem('--monitor', value!, 'chardev', MONITOR) });
        break;
      case '--chardev': {
        const c = parseItem('--chardev', value!, 'backend', CHARDEV);
        const id = c.id as string;
        if (o.chardevs.has(id)) throw new InvalidArgumentError(`--chardev: attempt to add duplicate property '${id}' to object (type 'container')`);
        const hasPath = c.path !== undefined;
        const hasHost = c.host !== undefined || c.port !== undefined;
        if (hasPath === hasHost) throw new InvalidArgumentError(`--chardev: chardev '${id}' needs either path= or host= and port=`);
        if (hasHost && (c.host === undefined || c.port === undefined)) throw new InvalidArgumentError(`--chardev: chardev '${id}' needs both host= and port=`);
        if (c.server !== true) throw new InvalidArgumentError(`--chardev: chardev '${id}': only server=on sockets are supported`);
        o.chardevs.set(id, {
          id,
          server: true,
          wait: (c.wait as boolean | undefined) ?? true,
          ...(hasPath ? { path: c.path as string } : { host: c.host as string, port: c.port as string }),
          ...(c['tls-creds'] !== undefined ? { tlsCreds: c['tls-creds'] as string } : {}),
        });
        break;
      }
      case '--pidfile':
        o.pidfile = value!;
        break;
      case '--log-level':
        if (!(LOG_LEVELS as string[]).includes(value!)) throw new InvalidArgumentError(`--log-level: '${value}' is not one of ${LOG_LEVELS.join(', ')}`);
        o.logLevel = value as LogLevel;
        break;
      case '--log-format':
        if (!(LOG_FORMATS as readonly string[]).includes(value!)) throw new InvalidArgumentError(`--log-format: '${value}' is not one of ${LOG_FORMATS.join(', ')}`);
        o.logFormat = value as LogFormat;
        break;
      case '--data-dir':
        o.dataDir = value!;
        break;
      case '--x-monitor-idle-timeout': {
        const n = Number(value);
        if (value!.trim() === '' || !Number.isFinite(n) || n < 0) throw new InvalidArgumentError(`--x-monitor-idle-timeout: '${value}' is not a non-negative number of seconds`);
        o.monitorIdleTimeout = n;
        break;
      }
      case '--daemonize':
        o.daemonize = true;
        break;
      case '--insecure':
        o.insecure = true;
        break;
      case '--default':
        o.defaults = true;
        break;
      case '-h':
      case '--help':
        o.help = true;
        break;
      default:
        throw new InvalidArgumentError(arg.startsWith('-') ? `unrecognized option '${arg}'` : `unexpected argument '${arg}'`);
    }
  }
  const used = new Set<string>();
  for (const item of o.items) {
    if (item.kind === 'monitor') {
      const id = item.options.chardev as string;
      if (!o.chardevs.has(id)) throw new InvalidArgumentError(`--monitor: chardev "${id}" not found`);
      if (used.has(id)) throw new InvalidArgumentError(`--monitor: chardev '${id}' is already in use`);
      used.add(id);
      if (item.options.mode === 'readline') throw new InvalidArgumentError(`--monitor: only mode=control (QMP) is supported`);
    }
  }
  if (o.items.filter((i) => i.kind === 'nbd-server').length > 1) throw new InvalidArgumentError('--nbd-server: only one NBD server can be started');
  return o;
}
