// `lockstep-qmp`: QMP commands in one connection, for scripts that call a monitor often (the
// Pacemaker resource agent ocf/lockstep calls it at every monitor). `lockstep qmp` loads the
// CLI and, for key=value arguments, the daemon's command schemas; this loads node:net, node:tls
// and the framing only, so a call costs little more than Node's own start.
//
//   lockstep-qmp (--socket PATH | --host H --port P [--tls-dir DIR]) COMMAND [JSON] [COMMAND [JSON] ...]
//
// Prints each command's return value as one JSON line, in order. Exit 0 when all succeeded;
// at the first error, "Class: desc" on stderr and exit 1 (later commands are not sent).

import { connect as netConnect, type Socket } from 'node:net';
import { connect as tlsConnect } from 'node:tls';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { JsonSplitter, type FrameResult } from '../qmp/framing.js';

const USAGE = 'Usage: lockstep-qmp (--socket PATH | --host H --port P [--tls-dir DIR]) COMMAND [JSON] [COMMAND [JSON] ...]\n';

interface Call {
  execute: string;
  arguments?: Record<string, unknown>;
}

/** The words after the options: command names, each optionally followed by a JSON object. */
export function parseCalls(words: readonly string[]): Call[] {
  const calls: Call[] = [];
  for (const w of words) {
    if (w.trim().startsWith('{')) {
      const last = calls[calls.length - 1];
      if (!last || last.arguments) throw new Error(`arguments '${w}' follow no command`);
      const v = JSON.parse(w) as unknown;
      if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error('the JSON arguments must be an object');
      last.arguments = v as Record<string, unknown>;
    } else if (/^[A-Za-z][A-Za-z0-9_-]*$/.test(w)) {
      calls.push({ execute: w });
    } else {
      throw new Error(`expected a command name or a JSON object, got '${w}'`);
    }
  }
  if (calls.length === 0) throw new Error('no command given');
  return calls;
}

function open(o: { socket?: string; host?: string; port?: number; tlsDir?: string }): Socket {
  if (o.socket !== undefined) return netConnect(o.socket);
  if (o.tlsDir !== undefined) {
    const read = (f: string) => {
      try {
        return readFileSync(join(o.tlsDir!, f));
      } catch {
        return undefined;
      }
    };
    const ca = read('ca-cert.pem');
    if (!ca) throw new Error(`cannot read ${join(o.tlsDir, 'ca-cert.pem')}`);
    const cert = read('client-cert.pem');
    const key = read('client-key.pem');
    return tlsConnect({ host: o.host!, port: o.port!, ca, ...(cert ? { cert } : {}), ...(key ? { key } : {}) });
  }
  return netConnect(o.port!, o.host!);
}

export async function run(argv: string[]): Promise<number> {
  const o: { socket?: string; host?: string; port?: number; tlsDir?: string } = {};
  let calls: Call[];
  try {
    let i = 0;
    for (; i < argv.length; i++) {
      const a = argv[i]!;
      const next = () => {
        const v = argv[++i];
        if (v === undefined) throw new Error(`option '${a}' needs an argument`);
        return v;
      };
      if (a === '--socket') o.socket = next();
      else if (a === '--host') o.host = next();
      else if (a === '--port') o.port = Number(next());
      else if (a === '--tls-dir') o.tlsDir = next();
      else if (a === '-h' || a === '--help') {
        process.stdout.write(USAGE);
        return 0;
      } else if (a.startsWith('-')) throw new Error(`unrecognized option '${a}'`);
      else break;
    }
    if ((o.host === undefined) !== (o.port === undefined) || (o.port !== undefined && !(Number.isInteger(o.port) && o.port > 0 && o.port < 65536))) {
      throw new Error('--host and --port go together (port 1..65535)');
    }
    if ((o.socket === undefined) === (o.host === undefined)) throw new Error('give either --socket or --host/--port');
    if (o.tlsDir !== undefined && o.socket !== undefined) throw new Error('--tls-dir is for --host/--port');
    calls = parseCalls(argv.slice(i));
  } catch (e) {
    process.stderr.write(`lockstep-qmp: ${(e as Error).message}\n${USAGE}`);
    return 1;
  }
  const where = o.socket ?? `${o.host}:${o.port}`;
  return new Promise<number>((resolve) => {
    let sock: Socket;
    try {
      sock = open(o);
    } catch (e) {
      process.stderr.write(`lockstep-qmp: ${(e as Error).message}\n`);
      resolve(1);
      return;
    }
    // the greeting, then qmp_capabilities' reply, then one reply per call; events are skipped
    const queue: Call[] = [{ execute: 'qmp_capabilities' }, ...calls];
    let greeted = false;
    let done = false;
    const finish = (code: number) => {
      if (done) return;
      done = true;
      sock.end();
      sock.destroy();
      resolve(code);
    };
    const timer = setTimeout(() => {
      process.stderr.write(`lockstep-qmp: no answer from the monitor at ${where} within 30 s\n`);
      finish(1);
    }, 30_000);
    timer.unref();
    const send = () => sock.write(JSON.stringify(queue[0]) + '\n');
    sock.on('error', (e) => {
      process.stderr.write(`lockstep-qmp: cannot talk to the monitor at ${where}: ${e.message}\n`);
      finish(1);
    });
    sock.on('close', () => {
      if (!done) process.stderr.write(`lockstep-qmp: the monitor at ${where} closed the connection\n`);
      finish(1);
    });
    const onFrame = (r: FrameResult) => {
      if (done || !r.ok) return;
      const msg = r.value as { QMP?: unknown; event?: string; return?: unknown; error?: { class: string; desc: string } };
      if (!greeted) {
        if (msg.QMP === undefined) return;
        greeted = true;
        send();
        return;
      }
      if (msg.event !== undefined) return;
      const call = queue.shift()!;
      if (msg.error) {
        process.stderr.write(`${msg.error.class}: ${msg.error.desc}\n`);
        clearTimeout(timer);
        finish(1);
        return;
      }
      if (call.execute !== 'qmp_capabilities') process.stdout.write(JSON.stringify(msg.return ?? {}) + '\n');
      if (queue.length === 0) {
        clearTimeout(timer);
        finish(0);
        return;
      }
      send();
    };
    const splitter = new JsonSplitter(onFrame, 64 * 1024 * 1024);
    sock.on('data', (chunk: Buffer) => splitter.feed(chunk));
  });
}
