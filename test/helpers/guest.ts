// A guest's view of a served disk: the NBD export as a block device without the kernel nbd
// module (nbdfuse exposes it as a file, losetup makes that a loop device), a filesystem on it,
// and the clean-up a crashed server needs: the FUSE connection is aborted through fusectl so
// that nothing waits forever on a server that is gone. Needs root, fuse3, nbdfuse, losetup and
// e2fsprogs; in CI their absence fails the test.

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { requireTool } from './processes.js';

const FUSECTL = '/sys/fs/fuse/connections';

export function run(cmd: string, args: string[], opts: { allowFail?: boolean; timeoutMs?: number } = {}): { status: number | null; out: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: opts.timeoutMs ?? 60_000 });
  const out = `${r.stdout ?? ''}${r.stderr ?? ''}`;
  if (!opts.allowFail && r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.status ?? r.signal ?? r.error?.message}): ${out.trim()}`);
  return { status: r.status, out };
}

/** run() without blocking the event loop (a supervisor or a bench may share the process, and
 *  anything that touches the served disk may wait for it: with output commit a flush waits
 *  for a checkpoint the supervisor runs). */
export function runAsync(cmd: string, args: string[], opts: { allowFail?: boolean; timeoutMs?: number } = {}): Promise<{ status: number | null; out: string }> {
  return new Promise((resolve, reject) => {
    const c = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], timeout: opts.timeoutMs ?? 60_000 });
    let out = '';
    c.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    c.stderr!.on('data', (d: Buffer) => (out += d.toString()));
    c.once('error', reject);
    c.once('close', (status, signal) => {
      if (!opts.allowFail && status !== 0) reject(new Error(`${cmd} ${args.join(' ')} failed (${status ?? signal}): ${out.trim()}`));
      else resolve({ status, out });
    });
  });
}

/** Whether a guest block device can be made here; throws in CI when it cannot. */
export function canMakeGuest(): boolean {
  const tools = ['nbdfuse', 'losetup', 'mkfs.ext4', 'e2fsck', 'mount', 'umount', 'sqlite3'];
  if (!tools.every((t) => requireTool(t))) return false;
  const why = process.getuid?.() !== 0 ? 'root is needed' : !existsSync('/dev/fuse') ? '/dev/fuse is missing' : !existsSync('/dev/loop-control') ? '/dev/loop-control is missing' : null;
  if (why && process.env.CI) throw new Error(`the guest tests need a FUSE and loop device setup: ${why}`);
  return why === null;
}

function mounted(dir: string): boolean {
  return readFileSync('/proc/mounts', 'utf8')
    .split('\n')
    .some((l) => l.split(' ')[1] === dir);
}

/** fusectl gives each FUSE connection an abort switch; mount it where it is missing. */
function ensureFusectl(): void {
  if (readFileSync('/proc/mounts', 'utf8').includes(` ${FUSECTL} fusectl `)) return;
  run('mount', ['-t', 'fusectl', 'fusectl', FUSECTL]);
}

/** One attachment of an NBD export as /dev/loopN, with an optional ext4 mount. */
export class GuestDisk {
  private nbdfuse: ChildProcess | null = null;
  private fuseConn: number | null = null;
  loop: string | null = null;
  mountpoint: string | null = null;
  private log = '';

  private constructor(readonly dir: string) {}

  /** nbdfuse on `uri` under `dir`/fuse, then a loop device on the file it shows. */
  static async attach(dir: string, uri: string): Promise<GuestDisk> {
    const g = new GuestDisk(dir);
    const fuseDir = join(dir, 'fuse');
    mkdirSync(fuseDir, { recursive: true });
    ensureFusectl();
    const child = spawn('nbdfuse', [join(fuseDir, 'disk'), uri], { stdio: ['ignore', 'pipe', 'pipe'] });
    g.nbdfuse = child;
    child.stdout!.on('data', (d: Buffer) => (g.log += d.toString()));
    child.stderr!.on('data', (d: Buffer) => (g.log += d.toString()));
    try {
      for (let i = 0; !(mounted(fuseDir) && existsSync(join(fuseDir, 'disk'))); i++) {
        if (child.exitCode !== null || i > 400) throw new Error(`nbdfuse on ${uri} did not come up: ${g.log.trim()}`);
        await new Promise((r) => setTimeout(r, 25));
      }
      const dev = statSync(fuseDir).dev;
      g.fuseConn = (dev & 0xff) | ((dev >> 12) & 0xfff00); // minor(): the connection's number
      // async: attaching fsyncs the FUSE file, which becomes an NBD flush; with output
      // commit that flush waits for a checkpoint, which a supervisor in this process runs
      g.loop = (await runAsync('losetup', ['-f', '--show', join(fuseDir, 'disk')])).out.trim();
    } catch (e) {
      await g.detach();
      throw e;
    }
    return g;
  }

  async mkfs(): Promise<void> {
    // default options: mkfs discards the whole device first, as a new user's mkfs does
    await runAsync('mkfs.ext4', ['-q', '-F', this.loop!], { timeoutMs: 300_000 });
  }

  async mount(): Promise<string> {
    const mnt = join(this.dir, 'mnt');
    mkdirSync(mnt, { recursive: true });
    await runAsync('mount', ['-t', 'ext4', this.loop!, mnt]);
    this.mountpoint = mnt;
    return mnt;
  }

  async umount(): Promise<void> {
    if (!this.mountpoint) return;
    await runAsync('umount', [this.mountpoint]);
    this.mountpoint = null;
  }

  /** e2fsck -fn: exit status and report (0 = clean). */
  fsck(): Promise<{ status: number | null; out: string }> {
    return runAsync('e2fsck', ['-fn', this.loop!], { allowFail: true, timeoutMs: 120_000 });
  }

  /**
   * Aborts the FUSE connection: every request waiting on the NBD server fails at once, so
   * that the unmount and the loop device's removal cannot hang on a dead server.
   */
  abort(): void {
    if (this.fuseConn === null) return;
    const f = join(FUSECTL, String(this.fuseConn), 'abort');
    if (existsSync(f)) writeFileSync(f, '1');
  }

  /** Takes everything down, whatever state it is in; `crashed`: abort the connection first. */
  async detach(crashed = false): Promise<void> {
    if (crashed) this.abort();
    if (this.mountpoint) {
      await runAsync('umount', crashed ? ['-l', this.mountpoint] : [this.mountpoint], { allowFail: true });
      if (!crashed && mounted(this.mountpoint)) {
        this.abort();
        await runAsync('umount', ['-l', this.mountpoint], { allowFail: true });
      }
      this.mountpoint = null;
    }
    if (this.loop) {
      await runAsync('losetup', ['-d', this.loop], { allowFail: true });
      this.loop = null;
    }
    const fuseDir = join(this.dir, 'fuse');
    if (mounted(fuseDir)) {
      await runAsync('umount', [fuseDir], { allowFail: true });
      if (mounted(fuseDir)) {
        this.abort();
        await runAsync('umount', ['-l', fuseDir], { allowFail: true });
      }
    }
    if (this.nbdfuse && this.nbdfuse.exitCode === null) this.nbdfuse.kill('SIGKILL');
    this.nbdfuse = null;
    this.fuseConn = null;
  }
}
