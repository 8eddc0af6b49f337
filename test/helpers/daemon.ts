// Test helpers: a `./bin/lockstep daemon` child process with a QMP Unix socket, and running
// `./bin/lockstep` commands.

import { spawn, type ChildProcess } from 'node:child_process';
import { join, resolve } from 'node:path';
import { QmpClient } from '../../src/qmp/client.js';

export const LOCKSTEP_BIN = resolve('bin/lockstep');

export interface DaemonProcess {
  proc: ChildProcess;
  qmpPath: string;
  /** stderr so far (JSON log lines) */
  stderr(): string;
  /** parsed log records so far */
  logs(): Array<Record<string, unknown>>;
  /** a negotiated QMP client (closed by stop()) */
  client(): Promise<QmpClient>;
  /** resolves with the exit code */
  exited: Promise<number | null>;
  /** SIGTERM (if still running) and wait */
  stop(): Promise<number | null>;
}

/**
 * Starts the daemon with a QMP monitor at `dir/qmp.sock` plus `args`, and waits until it
 * logs "daemon ready" (rejects with its stderr if it exits first).
 */
export async function startDaemon(t: { after(fn: () => unknown): void }, dir: string, args: string[], opts: { monitor?: boolean } = {}): Promise<DaemonProcess> {
  const qmpPath = join(dir, 'qmp.sock');
  const monitorArgs = opts.monitor === false ? [] : ['--chardev', `socket,id=mon0,path=${qmpPath},server=on,wait=off`, '--monitor', 'chardev=mon0'];
  const proc = spawn(process.execPath, [LOCKSTEP_BIN, 'daemon', ...args, ...monitorArgs, '--log-level', 'debug'], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let err = '';
  proc.stderr!.setEncoding('utf8');
  proc.stderr!.on('data', (d: string) => (err += d));
  proc.stdout!.resume();
  const exited = new Promise<number | null>((r) => proc.on('exit', (code) => r(code)));
  const clients: QmpClient[] = [];
  const d: DaemonProcess = {
    proc,
    qmpPath,
    stderr: () => err,
    logs: () =>
      err
        .split('\n')
        .filter((l) => l.startsWith('{'))
        .map((l) => JSON.parse(l) as Record<string, unknown>),
    client: async () => {
      const c = await QmpClient.open({ type: 'unix', path: qmpPath });
      clients.push(c);
      return c;
    },
    exited,
    stop: async () => {
      for (const c of clients) c.close();
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGTERM');
      return exited;
    },
  };
  t.after(() => d.stop());
  await new Promise<void>((resolveReady, reject) => {
    const timer = setTimeout(() => reject(new Error(`daemon not ready in 20 s:\n${err}`)), 20_000);
    const onData = () => {
      if (err.includes('"daemon ready"')) {
        clearTimeout(timer);
        resolveReady();
      }
    };
    proc.stderr!.on('data', onData);
    void exited.then((code) => {
      clearTimeout(timer);
      reject(new Error(`daemon exited with ${code} during start-up:\n${err}`));
    });
    onData();
  });
  return d;
}

export interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs `./bin/lockstep ARGS` to completion. */
export function runLockstep(args: string[], opts: { input?: string; timeoutMs?: number } = {}): Promise<RunResult> {
  return new Promise((resolveRun) => {
    const p = spawn(process.execPath, [LOCKSTEP_BIN, ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    p.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    p.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => p.kill('SIGKILL'), opts.timeoutMs ?? 30_000);
    p.on('close', (code) => {
      clearTimeout(timer);
      resolveRun({ code, stdout, stderr });
    });
    p.stdin.end(opts.input ?? '');
  });
}

/**
 * Whether this build has wired a part that lands from another branch (src/daemon/wiring.ts):
 * block jobs, the NBD server, the qemu-io engine. Tests of those parts skip with the reason
 * until it is wired; once wired, they run and must pass.
 */
export async function buildHas(c: QmpClient, part: 'jobs' | 'nbd' | 'qemu-io', scratchDir: string): Promise<boolean> {
  if (part === 'jobs') {
    return c.execute('query-jobs').then(
      () => true,
      (e: { desc?: string }) => e.desc !== 'Block jobs are not available in this build',
    );
  }
  if (part === 'nbd') {
    try {
      await c.execute('nbd-server-start', { addr: { type: 'unix', data: { path: join(scratchDir, 'probe-nbd.sock') } } });
    } catch (e) {
      return (e as { desc?: string }).desc !== 'NBD server is not available in this build';
    }
    await c.execute('nbd-server-stop');
    return true;
  }
  await c.execute('blockdev-add', { driver: 'null-co', 'node-name': 'qemu-io-probe', size: 512 });
  const out = (await c.execute('human-monitor-command', { 'command-line': 'qemu-io qemu-io-probe "length"' })) as string;
  await c.execute('blockdev-del', { 'node-name': 'qemu-io-probe' });
  return !out.includes('qemu-io is not available in this build');
}

/** Asserts that a QMP command fails with a `desc` matching `desc`. */
export async function rejectsWithDesc(p: Promise<unknown>, desc: RegExp): Promise<void> {
  let error: unknown = null;
  try {
    await p;
  } catch (e) {
    error = e;
  }
  if (error === null) throw new Error(`expected the command to fail with ${desc}, it succeeded`);
  const text = String((error as { desc?: string }).desc);
  if (!desc.test(text)) throw new Error(`expected an error matching ${desc}, got: ${text}`);
}
