// `lockstep qmp`: send one QMP command to a daemon, or talk to it interactively.
//   lockstep qmp [--socket PATH | --host H --port P] [--tls-dir DIR] COMMAND [key=value ... | JSON]
// key=value arguments are typed by the command's schema (enable=true is a boolean, speed=10 a
// number) and dotted keys nest (addr.data.port=10809). Prints `return` as JSON and exits 0, or
// prints "Class: desc" on stderr and exits 1. Without COMMAND: an interactive prompt with
// history that also prints events.

import { readFileSync, appendFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { parseArgs } from 'node:util';
import type { ConnectionOptions } from 'node:tls';
import { errorMessage } from '../errors.js';
import { QmpClient, QmpCommandError } from '../qmp/client.js';
import type { QmpCommand } from '../qmp/dispatch.js';
import { coerceStrings, nestDotted, type Fields, type TypeSpec } from '../qmp/schema/types.js';
import type { SocketAddress } from '../util/socket-address.js';

const USAGE = `Usage: lockstep qmp [--socket PATH | --host H --port P] [--tls-dir DIR] [COMMAND [key=value ... | JSON]]
Send a QMP command to a lockstep (or QEMU) monitor and print its return value as JSON.

  --socket PATH    Unix socket of the monitor (default ./lockstep-data/qmp.sock)
  --host H --port P  TCP monitor
  --tls-dir DIR    connect with TLS using DIR/ca-cert.pem (and client-cert.pem,
                   client-key.pem when present)
  --pretty         indent the output (default when writing to a terminal)
  -h, --help       this help

Arguments: key=value pairs typed by the command's schema (flat=true, speed=1048576),
dotted keys for nested members (addr.type=unix addr.data.path=/tmp/nbd.sock), or one JSON
object. Without COMMAND, an interactive prompt (history, events printed as they arrive).
Exit status: 0 on success, 1 when the command fails or the monitor cannot be reached.
`;

/** The commands' argument schemas, from the daemon's own command tables. Loading them means
 *  loading the whole daemon (most of a one-shot call's time), so only key=value arguments and
 *  the interactive prompt ask for them; JSON arguments go out as they are. */
async function schemaTable(): Promise<Map<string, Fields | TypeSpec>> {
  const [{ builtinCommandGroups }, { wire }, { Logger }] = await Promise.all([import('../daemon/daemon.js'), import('../daemon/wiring.js'), import('../util/log.js')]);
  const groups: Array<readonly QmpCommand[]> = [...builtinCommandGroups(), ...(wire(new Logger('silent')).deps.commands ?? [])];
  const m = new Map<string, Fields | TypeSpec>();
  for (const g of groups) for (const c of g) m.set(c.name, c.args);
  return m;
}

/** Builds the arguments object from the words after the command name. */
export function buildArguments(schema: Fields | TypeSpec | undefined, words: string[]): Record<string, unknown> | undefined {
  if (words.length === 0) return undefined;
  if (words.length === 1 && words[0]!.trim().startsWith('{')) {
    const v = JSON.parse(words[0]!) as unknown;
    if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error('the JSON arguments must be an object');
    return v as Record<string, unknown>;
  }
  const pairs: Array<[string, string]> = words.map((w) => {
    const eq = w.indexOf('=');
    if (eq <= 0) throw new Error(`expected key=value, got '${w}'`);
    return [w.slice(0, eq), w.slice(eq + 1)];
  });
  const nested = nestDotted(pairs);
  return coerceStrings(schema ?? { dict: true }, nested) as Record<string, unknown>;
}

function tlsFromDir(dir: string): ConnectionOptions {
  const read = (f: string) => {
    try {
      return readFileSync(join(dir, f));
    } catch {
      return undefined;
    }
  };
  const ca = read('ca-cert.pem');
  if (!ca) throw new Error(`cannot read ${join(dir, 'ca-cert.pem')}`);
  const cert = read('client-cert.pem');
  const key = read('client-key.pem');
  return { ca, ...(cert ? { cert } : {}), ...(key ? { key } : {}) };
}

const QMP_OPTIONS = {
  socket: { type: 'string' },
  host: { type: 'string' },
  port: { type: 'string' },
  'tls-dir': { type: 'string' },
  pretty: { type: 'boolean' },
  help: { type: 'boolean', short: 'h' },
} as const;

export interface QmpArgs {
  socket?: string;
  host?: string;
  port?: number;
  tlsDir?: string;
  pretty?: boolean;
  /** -h/--help came before any error */
  help?: boolean;
  /** the command and its arguments: everything from the first word that is not an option */
  rest: string[];
}

/**
 * `lockstep qmp`'s options (node:util parseArgs). Options end at the first other word: the
 * command's key=value arguments are never taken for options. Throws on an unknown option or
 * a missing value; -h/--help stops at once, as it did before anything after it was read.
 */
export function parseQmpArgs(argv: string[]): QmpArgs {
  // strict: false, so that the messages are lockstep's own and the walk stops at the command
  const { tokens } = parseArgs({ args: argv, options: QMP_OPTIONS, strict: false, allowPositionals: true, tokens: true });
  const out: QmpArgs = { rest: [] };
  for (const t of tokens) {
    if (t.kind === 'positional') {
      out.rest = argv.slice(t.index);
      break;
    }
    const raw = argv[t.index]!;
    if (t.kind === 'option-terminator' || !Object.hasOwn(QMP_OPTIONS, t.name)) throw new Error(`unrecognized option '${raw}'`);
    const name = t.name as keyof typeof QMP_OPTIONS;
    if (QMP_OPTIONS[name].type === 'boolean') {
      if (t.inlineValue) throw new Error(`unrecognized option '${raw}'`);
      if (name === 'help') return { ...out, help: true };
      out.pretty = true;
      continue;
    }
    if (t.value === undefined) throw new Error(`option '${t.rawName}' needs an argument`);
    if (name === 'socket') out.socket = t.value;
    else if (name === 'host') out.host = t.value;
    else if (name === 'port') out.port = Number(t.value);
    else out.tlsDir = t.value;
  }
  return out;
}

export async function run(argv: string[]): Promise<number> {
  let parsed: QmpArgs;
  try {
    parsed = parseQmpArgs(argv);
  } catch (e) {
    process.stderr.write(`lockstep qmp: ${errorMessage(e)}\n`);
    return 1;
  }
  if (parsed.help) {
    process.stdout.write(USAGE);
    return 0;
  }
  const { socket: socketPath, host, port, tlsDir, rest } = parsed;
  const pretty = parsed.pretty ?? process.stdout.isTTY === true;
  if ((host === undefined) !== (port === undefined) || (port !== undefined && !(Number.isInteger(port) && port > 0 && port < 65536))) {
    process.stderr.write('lockstep qmp: --host and --port go together (port 1..65535)\n');
    return 1;
  }
  if (socketPath !== undefined && host !== undefined) {
    process.stderr.write('lockstep qmp: give either --socket or --host/--port\n');
    return 1;
  }
  const addr: SocketAddress = host !== undefined ? { type: 'inet', host, port: port! } : { type: 'unix', path: socketPath ?? join('lockstep-data', 'qmp.sock') };
  let client: QmpClient;
  try {
    client = await QmpClient.open(addr, tlsDir ? { tls: tlsFromDir(tlsDir) } : {});
  } catch (e) {
    const where = 'path' in addr ? addr.path : `${addr.host}:${addr.port}`;
    process.stderr.write(`lockstep qmp: cannot talk to the monitor at ${where}: ${errorMessage(e)}\n`);
    return 1;
  }
  const fmt = (v: unknown) => (pretty ? JSON.stringify(v, null, 2) : JSON.stringify(v));
  try {
    if (rest.length === 0) return await interactive(client, await schemaTable(), fmt);
    const [name, ...words] = rest as [string, ...string[]];
    const json = words.length === 0 || (words.length === 1 && words[0]!.trim().startsWith('{'));
    let args: Record<string, unknown> | undefined;
    try {
      args = buildArguments(json ? undefined : (await schemaTable()).get(name), words);
    } catch (e) {
      process.stderr.write(`lockstep qmp: ${errorMessage(e)}\n`);
      return 1;
    }
    try {
      const ret = await client.execute(name, args);
      process.stdout.write(fmt(ret) + '\n');
      return 0;
    } catch (e) {
      if (e instanceof QmpCommandError) process.stderr.write(`${e.errorClass}: ${e.desc}\n`);
      else process.stderr.write(`lockstep qmp: ${errorMessage(e)}\n`);
      return 1;
    }
  } finally {
    client.close();
  }
}

async function interactive(client: QmpClient, schemas: Map<string, Fields | TypeSpec>, fmt: (v: unknown) => string): Promise<number> {
  const historyFile = join(homedir(), '.lockstep_qmp_history');
  let history: string[] = [];
  try {
    history = readFileSync(historyFile, 'utf8').split('\n').filter(Boolean).reverse().slice(0, 500);
  } catch {
    /* no history yet */
  }
  const rl = createInterface({
    input: process.stdin,
    output: process.stdout,
    prompt: '(QMP) ',
    history,
    historySize: 500,
    completer: (line: string) => {
      const names = [...schemas.keys()].filter((n) => n.startsWith(line));
      return [names, line];
    },
  } as Parameters<typeof createInterface>[0]);
  const v = client.greeting?.QMP.version;
  process.stdout.write(`Connected to ${v?.package ?? 'QMP'} (QEMU ${v?.qemu.major}.${v?.qemu.minor}.${v?.qemu.micro}). Type 'help' for the command list, Ctrl-D to leave.\n`);
  client.on('event', (ev: unknown) => {
    process.stdout.write(`\nevent: ${JSON.stringify(ev)}\n`);
    rl.prompt(true);
  });
  client.on('close', () => {
    process.stdout.write('\nconnection closed\n');
    rl.close();
  });
  rl.prompt();
  for await (const line of rl) {
    const text = line.trim();
    if (text === '') {
      rl.prompt();
      continue;
    }
    try {
      appendFileSync(historyFile, text + '\n');
    } catch {
      /* history is best effort */
    }
    if (text === 'help') {
      process.stdout.write([...schemas.keys()].sort().join('\n') + '\n');
      rl.prompt();
      continue;
    }
    if (text === 'quit-shell' || text === 'exit') break;
    const sp = text.search(/\s/);
    const name = sp < 0 ? text : text.slice(0, sp);
    const argText = sp < 0 ? '' : text.slice(sp + 1).trim();
    try {
      const words = argText === '' ? [] : argText.startsWith('{') ? [argText] : argText.split(/\s+/);
      const ret = await client.execute(name, buildArguments(schemas.get(name), words));
      process.stdout.write(fmt(ret) + '\n');
    } catch (e) {
      if (e instanceof QmpCommandError) process.stdout.write(`error: ${e.errorClass}: ${e.desc}\n`);
      else process.stdout.write(`error: ${errorMessage(e)}\n`);
      if (client.closed) break;
    }
    rl.prompt();
  }
  rl.close();
  return 0;
}
