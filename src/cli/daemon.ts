// `lockstep daemon`: qemu-storage-daemon's command line. Parsing and wiring only; the work is
// in src/daemon.

import type { Readable } from 'node:stream';
import { spawn } from 'node:child_process';
import { createWriteStream } from 'node:fs';
import { Daemon } from '../daemon/daemon.js';
import { applyDefaults, describeDefaults, type DefaultLayout } from '../daemon/default.js';
import { Logger, defaultLogFormat } from '../util/log.js';
import { DAEMON_USAGE, parseDaemonArgs, type DaemonOptions } from '../daemon/options.js';
import { wire } from '../daemon/wiring.js';
import { errorMessage } from '../errors.js';
import { runIoCommand } from './io-commands.js';
import { notifyReady, takeNotifySocket } from './systemd.js';

/** fd on which a daemonized child reports "ok" or the start-up error to its parent */
const READY_FD_ENV = 'LOCKSTEP_DAEMON_READY_FD';

export async function run(argv: string[]): Promise<number> {
  let opts: DaemonOptions;
  try {
    opts = parseDaemonArgs(argv);
  } catch (e) {
    process.stderr.write(`lockstep daemon: ${errorMessage(e)}\n`);
    return 1;
  }
  if (opts.help) {
    process.stdout.write(DAEMON_USAGE);
    return 0;
  }
  if (opts.daemonize && process.env[READY_FD_ENV] === undefined) return daemonize(argv);
  const readyFd = process.env[READY_FD_ENV] !== undefined ? Number(process.env[READY_FD_ENV]) : null;
  const report = (msg: string) => {
    if (readyFd === null) return;
    const s = createWriteStream('', { fd: readyFd });
    s.end(msg + '\n');
  };

  const format = opts.logFormat ?? defaultLogFormat(process.stderr);
  const notifySocket = takeNotifySocket();
  const log = new Logger(opts.logLevel, undefined, {}, { format, color: format === 'human' && process.stderr.isTTY === true && !process.env.NO_COLOR });
  const wiring = wire(log, (backend, line, out) => runIoCommand(backend, line, out));
  let layout: DefaultLayout | null = null;
  try {
    if (opts.defaults) layout = await applyDefaults(opts, wiring.createQcow2);
  } catch (e) {
    process.stderr.write(`lockstep daemon: --default: ${errorMessage(e)}\n`);
    report(`error: --default: ${errorMessage(e)}`);
    return 1;
  }
  const daemon = new Daemon(opts, wiring.deps);
  const onSignal = (sig: NodeJS.Signals) => {
    log.info('signal received', { signal: sig });
    void daemon.shutdown('host-signal');
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
  try {
    await daemon.start();
  } catch (e) {
    process.stderr.write(`lockstep daemon: ${errorMessage(e)}\n`);
    report(`error: ${errorMessage(e)}`);
    process.off('SIGTERM', onSignal);
    process.off('SIGINT', onSignal);
    return 1;
  }
  report('ok');
  notifyReady(undefined, notifySocket);
  if (layout) process.stdout.write(describeDefaults(layout));
  const code = await daemon.done;
  process.off('SIGTERM', onSignal);
  process.off('SIGINT', onSignal);
  // Nothing should keep the loop alive now; if something does, do not hang forever.
  setTimeout(() => process.exit(code), 2000).unref();
  return code;
}

/**
 * --daemonize: starts a detached copy of this command (without --daemonize) and waits until it
 * reports that start-up finished; exits 0 then, or 1 with the child's error.
 */
async function daemonize(argv: string[]): Promise<number> {
  const script = process.argv[1]!;
  const args = [script, 'daemon', ...argv.filter((a) => a !== '--daemonize')];
  const child = spawn(process.execPath, args, {
    detached: true,
    stdio: ['ignore', 'ignore', 'ignore', 'pipe'],
    env: { ...process.env, [READY_FD_ENV]: '3' },
  });
  const pipe = child.stdio[3] as Readable;
  let text = '';
  pipe.setEncoding('utf8');
  pipe.on('data', (d: string) => (text += d));
  const code = await new Promise<number>((resolve) => {
    pipe.on('end', () => resolve(text.startsWith('ok') ? 0 : 1));
    child.on('exit', () => resolve(text.startsWith('ok') ? 0 : 1));
  });
  if (code !== 0) process.stderr.write(`lockstep daemon: ${text.replace(/^error: /, '').trim() || 'the daemon exited during start-up'}\n`);
  child.unref();
  pipe.destroy();
  return code;
}
