// Starting QEMU (qemu-system-x86_64 -machine none) and `lockstep daemon` as real processes
// with a QMP socket, for interop tests and benchmarks. Both are driven the same way: QMP
// commands, and HMP `qemu-io` through human-monitor-command.

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { QmpClient } from '../../src/qmp/client.js';

export const REPO_ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
export const LOCKSTEP_BIN = join(REPO_ROOT, 'bin', 'lockstep');

/** Fails when a tool is missing in CI; returns false (skip with reason) elsewhere. */
export function requireTool(tool: string): boolean {
  const found = spawnSync('sh', ['-c', `command -v ${tool}`]).status === 0;
  if (!found && process.env.CI) throw new Error(`required tool '${tool}' is not installed`);
  return found;
}

export interface Proc {
  readonly kind: 'qemu' | 'lockstep';
  readonly qmp: QmpClient;
  readonly child: ChildProcess;
  /** what the process printed on stdout (QEMU prints qemu-io output there) */
  stdout(): string;
  /** runs `qemu-io DEVICE "CMD"` through HMP; throws on a reported failure */
  io(device: string, cmd: string): Promise<string>;
  /** QMP quit and wait for the exit */
  quit(): Promise<void>;
  kill(): Promise<void>;
}

async function waitForSocket(path: string, child: ChildProcess, log: () => string): Promise<void> {
  for (let i = 0; i < 200; i++) {
    if (existsSync(path)) return;
    if (child.exitCode !== null) throw new Error(`process exited (${child.exitCode}): ${log()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`no QMP socket at ${path}: ${log()}`);
}

async function wrap(kind: 'qemu' | 'lockstep', child: ChildProcess, qmpPath: string): Promise<Proc> {
  let out = '';
  let err = '';
  child.stdout?.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr?.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  await waitForSocket(qmpPath, child, () => err);
  // the socket file exists from bind(), before listen(): a connect in between is refused
  let qmp: QmpClient | undefined;
  for (let i = 0; qmp === undefined; i++) {
    try {
      qmp = await QmpClient.open({ type: 'unix', path: qmpPath });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ECONNREFUSED' || i >= 200 || child.exitCode !== null) throw e;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  const proc: Proc = {
    kind,
    qmp,
    child,
    stdout: () => out,
    async io(device, cmd) {
      const before = out.length;
      const ret = String(await qmp.execute('human-monitor-command', { 'command-line': `qemu-io ${device} "${cmd}"` }));
      // QEMU prints qemu-io's output on its stdout; lockstep returns it in the reply
      await new Promise((r) => setTimeout(r, kind === 'qemu' ? 20 : 0));
      const text = kind === 'qemu' ? out.slice(before) : ret;
      if (/failed|error|Error/.test(text)) throw new Error(`${kind} qemu-io ${device} "${cmd}": ${text.trim()}`);
      return text;
    },
    async quit() {
      if (child.exitCode !== null) return;
      await qmp.execute('quit').catch(() => {});
      qmp.close();
      await exited;
    },
    async kill() {
      if (child.exitCode === null) child.kill('SIGKILL');
      qmp.close();
      await exited;
    },
  };
  return proc;
}

export async function startQemu(dir: string, name: string, args: string[]): Promise<Proc> {
  const qmpPath = join(dir, `${name}.qmp`);
  const child = spawn(
    'qemu-system-x86_64',
    ['-machine', 'none', '-nodefaults', '-display', 'none', '-qmp', `unix:${qmpPath},server=on,wait=off`, ...args],
    { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  return wrap('qemu', child, qmpPath);
}

export async function startLockstep(dir: string, name: string, args: string[]): Promise<Proc> {
  const qmpPath = join(dir, `${name}.qmp`);
  const child = spawn(
    process.execPath,
    [LOCKSTEP_BIN, 'daemon', '--chardev', `socket,id=mon0,path=${qmpPath},server=on,wait=off`, '--monitor', 'chardev=mon0', ...args],
    { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  return wrap('lockstep', child, qmpPath);
}

/**
 * SIGKILLs every process whose command line names `path` (a test's temporary directory), for
 * cleanup after tests whose processes are started by other programs (an OCF agent, setsid)
 * and may outlive their pid files. Returns the pids killed.
 */
export function killProcessesNaming(path: string): number[] {
  const killed: number[] = [];
  for (const entry of readdirSync('/proc')) {
    const pid = Number(entry);
    if (!Number.isInteger(pid) || pid === process.pid) continue;
    let cmdline: string;
    try {
      cmdline = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
    } catch {
      continue; // gone meanwhile
    }
    if (!cmdline.split('\0').some((arg) => arg.includes(path))) continue;
    try {
      process.kill(pid, 'SIGKILL');
      killed.push(pid);
    } catch {
      /* gone */
    }
  }
  return killed;
}
