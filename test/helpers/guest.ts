// A guest's view of a served disk: the NBD export as a block device without the kernel nbd
// module (nbdfuse exposes it as a file, losetup makes that a loop device), a filesystem on it,
// and the clean-up a crashed server needs: the FUSE connection is aborted through fusectl so
// that nothing waits forever on a server that is gone. Needs root, fuse3, nbdfuse, losetup and
// e2fsprogs; in CI their absence fails the test.

import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { open, readFile, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { requireTool } from './processes.js';
import { PairSupervisor } from '../../src/pair/supervisor.js';
import { DISK_NODE, PRIMARY_LOCAL } from '../../src/pair/setup.js';
import { NbdClient } from '../../src/nbd/client/client.js';

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

  /**
   * nbdfuse on `uri` under `dir`/fuse, then a loop device on the file it shows. With `netns`
   * the NBD client runs in that network namespace (only the network: the mounts stay ours).
   */
  static async attach(dir: string, uri: string, opts: { netns?: string } = {}): Promise<GuestDisk> {
    const g = new GuestDisk(dir);
    const fuseDir = join(dir, 'fuse');
    mkdirSync(fuseDir, { recursive: true });
    ensureFusectl();
    const argv = ['nbdfuse', join(fuseDir, 'disk'), uri];
    if (opts.netns) argv.unshift('nsenter', `--net=/run/netns/${opts.netns}`);
    const child = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
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

// ---- a pair for a guest ------------------------------------------------------------------

/** A `lockstep pair` in `dir` serving disk.sock, checkpoints only when asked (or by output commit). */
export function guestPair(dir: string, size: number, flushCommit = true): PairSupervisor {
  return new PairSupervisor({
    flushCommit,
    // these scenarios expect a lost secondary to stay lost (degraded)
    reprotect: false,
    dataDir: dir,
    size,
    checkpointIntervalMs: 0,
    // generous: a loaded CI machine must not fail a live primary over in the middle of the
    // scenario (a SIGKILL is seen at once through the process's exit anyway)
    heartbeatIntervalMs: 100,
    heartbeatTimeoutMs: 2000,
    failover: 'auto',
    nbdSocket: join(dir, 'disk.sock'),
    log: () => {},
  });
}

export const guestUri = (dir: string): string => `nbd+unix:///disk?socket=${join(dir, 'disk.sock')}`;

/**
 * What the primary's disk held at each checkpoint, byte for byte, to compare a recovered disk
 * with. The supervisor's own QMP calls are wrapped: once its block-io-hold on the served disk
 * has drained the guest's writes, what the primary's local disk (under the replication
 * quorum, exported read-only for this) holds is what the secondary's checkpoint then keeps.
 * Reading the whole disk in every barrier made them so long that the guest got little
 * acknowledged, so a barrier reads only the regions the primary's replication filter lists
 * as changed (x-query-replication-changed: reset only by a barrier whose checkpoint
 * succeeded, so they cover everything since the last confirmed one). Barrier 1, 65, 129, ...
 * also read the whole disk and record any difference in `errors`: a region missing from the
 * list cannot go unnoticed. A checkpoint whose answer never came may have happened: it stays
 * a candidate until a later one is confirmed. A read that fails (the primary died) fails the
 * barrier before the secondary is asked, so no checkpoint goes unrecorded.
 */
export class CheckpointDisks {
  static readonly VERIFY_EVERY = 64;
  /** the disk at the last confirmed checkpoint (updated in place) */
  private done: Buffer;
  /** later checkpoints sent but not confirmed: the regions changed since `done`, read */
  private pending: Patch[][] = [];
  private held: Patch[] | null = null;
  /** barriers recorded (confirmed or not), of them read whole, and the time spent reading */
  count = 0;
  verified = 0;
  captureMs = 0;
  readonly errors: string[] = [];

  private constructor(initial: Buffer) {
    this.done = initial;
  }

  /** Starts recording on a protected pair whose primary serves the disk on `socket`; nothing
   *  may write to the disk yet (its state now is the first candidate). */
  static async attach(t: { after(fn: () => unknown): void }, sup: PairSupervisor, socket: string): Promise<CheckpointDisks> {
    const primary = sup.primary!;
    await sup.call(primary, 'block-export-add', { type: 'nbd', id: 'test-local', 'node-name': PRIMARY_LOCAL, name: 'test-local' });
    const local = await NbdClient.connect({ address: { type: 'unix', path: socket }, exportName: 'test-local' });
    t.after(() => local.destroy());
    const size = local.info.size;
    const cd = new CheckpointDisks(await local.read(0, size));
    const call = sup.call.bind(sup);
    const capture = async (): Promise<Patch[]> => {
      const list = (await call(primary, 'x-query-replication-changed')) as Array<{ regions: Array<{ offset: number; length: number }> }>;
      assert.equal(list.length, 1, 'one primary replication filter');
      const regions = list[0]!.regions.map((r) => ({ offset: r.offset, length: Math.min(r.length, size - r.offset) }));
      const patches = await Promise.all(regions.map(async (r) => ({ offset: r.offset, data: await local.read(r.offset, r.length) })));
      cd.count++;
      if (cd.count % CheckpointDisks.VERIFY_EVERY === 1) {
        const whole = await local.read(0, size);
        cd.verified++;
        const built = apply(cd.done, patches);
        if (!built.equals(whole)) {
          const at = built.findIndex((x, i) => x !== whole[i]);
          cd.errors.push(`barrier ${cd.count}: the disk differs from the last checkpoint's plus the regions listed as changed, first at byte ${at}`);
          return [{ offset: 0, data: whole }];
        }
      }
      return patches;
    };
    sup.call = async (side, command, args, timeoutMs) => {
      if (command === 'xen-colo-do-checkpoint' && cd.held) {
        const patches = cd.held;
        cd.held = null;
        cd.pending.push(patches);
        const r = await call(side, command, args, timeoutMs);
        for (const p of patches) p.data.copy(cd.done, p.offset);
        cd.pending = [];
        return r;
      }
      const r = await call(side, command, args, timeoutMs);
      if (command === 'block-io-hold' && side === primary && args?.['node-name'] === DISK_NODE) {
        const t0 = performance.now();
        cd.held = await capture();
        cd.captureMs += performance.now() - t0;
      }
      return r;
    };
    return cd;
  }

  /** The disks a recovered one may equal: the last confirmed checkpoint's and any later. */
  candidates(): Buffer[] {
    return [this.done, ...this.pending.map((p) => apply(this.done, p))];
  }
}

interface Patch {
  offset: number;
  data: Buffer;
}

function apply(base: Buffer, patches: Patch[]): Buffer {
  const out = Buffer.from(base);
  for (const p of patches) p.data.copy(out, p.offset);
  return out;
}

/** The whole disk served at `socket`, read before anything mounts it. */
export async function readServedDisk(socket: string): Promise<Buffer> {
  const c = await NbdClient.connect({ address: { type: 'unix', path: socket }, exportName: 'disk' });
  try {
    return await c.read(0, c.info.size);
  } finally {
    await c.disconnect();
  }
}

/**
 * A protected pair in `root`/pair, ext4 made by a default mkfs on its served disk and mounted,
 * a Workload on it (not started). Taken down after the test, the guest first: nothing of it
 * may wait on a daemon being stopped.
 */
export async function guestOnNewPair(
  t: { after(fn: () => unknown): void },
  root: string,
  size: number,
  flushCommit = true,
  /** run once the pair is protected, before the guest touches the disk */
  started?: (sup: PairSupervisor) => Promise<void>,
): Promise<{ sup: PairSupervisor; guest: GuestDisk; work: Workload }> {
  const dir = join(root, 'pair');
  const sup = guestPair(dir, size, flushCommit);
  let guest: GuestDisk | null = null;
  t.after(async () => {
    await guest?.detach(true);
    await sup.stop();
  });
  await sup.start();
  await started?.(sup);
  guest = await GuestDisk.attach(join(root, 'before'), guestUri(dir));
  await guest.mkfs();
  return { sup, guest, work: new Workload(await guest.mount()) };
}

// ---- a guest workload and what must survive it ------------------------------------------

/** Something the guest was told is durable: when it was told, on two clocks. */
export interface Ack {
  /** performance.now() of this process */
  at: number;
  /** Date.now(): comparable with another process's log */
  wall: number;
}

const ack = (): Ack => ({ at: performance.now(), wall: Date.now() });

/**
 * Files and database transactions on a mounted filesystem, each recorded only once the guest
 * was told it is durable: a file once its data fsync and its directory's fsync returned, a
 * transaction once sqlite3 (synchronous=EXTRA, rollback journal) returned from its COMMIT.
 */
export class Workload {
  readonly files = new Map<string, { data: Buffer } & Ack>();
  /** each transaction inserts one row: its id and the payload rowPayload(id) */
  readonly commits: Array<{ id: number } & Ack> = [];
  errors = 0;
  firstError = '';
  private stopped = false;
  private loops: Promise<void>[] = [];

  constructor(readonly mnt: string) {}

  start(): void {
    this.loops.push(this.fileLoop(), this.dbLoop());
  }

  private async fileLoop(): Promise<void> {
    for (let i = 0; !this.stopped; i++) {
      const name = `f${i}`;
      const data = randomBytes(4096 + ((i * 7919) % 200_000));
      try {
        const fh = await open(join(this.mnt, name), 'w');
        try {
          await fh.writeFile(data);
          await fh.sync();
        } finally {
          await fh.close();
        }
        const d = await open(this.mnt, 'r');
        try {
          await d.sync();
        } finally {
          await d.close();
        }
        this.files.set(name, { data, ...ack() });
      } catch (e) {
        this.fail(e);
        return;
      }
    }
  }

  private async dbLoop(): Promise<void> {
    const db = join(this.mnt, 'test.db');
    const sql = (s: string) =>
      new Promise<void>((resolve, reject) => {
        const c = spawn('sqlite3', [db, s], { stdio: ['ignore', 'ignore', 'pipe'] });
        let err = '';
        c.stderr!.on('data', (d: Buffer) => (err += d.toString()));
        c.once('exit', (code) => (code === 0 ? resolve() : reject(new Error(`sqlite3: ${err}`))));
      });
    try {
      await sql('PRAGMA journal_mode=DELETE; PRAGMA synchronous=EXTRA; CREATE TABLE t (n INTEGER PRIMARY KEY, v BLOB);');
      for (let n = 1; !this.stopped; n++) {
        await sql(`PRAGMA synchronous=EXTRA; BEGIN; INSERT INTO t VALUES (${n}, X'${rowPayload(n).toString('hex')}'); COMMIT;`);
        this.commits.push({ id: n, ...ack() });
      }
    } catch (e) {
      this.fail(e);
    }
  }

  private fail(e: unknown): void {
    this.errors++;
    this.firstError ||= String(e);
  }

  /** Waits for the loops; a crashed disk makes them fail, which is expected then. */
  async stop(): Promise<void> {
    this.stopped = true;
    await Promise.all(this.loops);
  }

  /** What the guest was told is durable before `t` (performance.now()). */
  durableBefore(t: number): Durable {
    const files = [...this.files].filter(([, f]) => f.at < t).map(([n, f]) => [n, f.data] as [string, Buffer]);
    const rows = this.commits.filter((c) => c.at < t).map((c) => c.id);
    return { files, rows };
  }

  /** The last acknowledgement of either kind, or null. */
  lastAck(): ({ what: string } & Ack) | null {
    let last: ({ what: string } & Ack) | null = null;
    for (const [n, f] of this.files) if (!last || f.at > last.at) last = { what: `file ${n}`, at: f.at, wall: f.wall };
    for (const c of this.commits) if (!last || c.at > last.at) last = { what: `commit of row ${c.id}`, at: c.at, wall: c.wall };
    return last;
  }
}

/** The payload of the database row `id`: 3000 bytes derived from the id alone, so that a
 *  recovered row can be checked byte for byte (and a row holding another's payload is caught). */
export function rowPayload(id: number): Buffer {
  const parts: Buffer[] = [];
  for (let k = 0; k < 94; k++) parts.push(createHash('sha256').update(`row ${id} part ${k}`).digest());
  return Buffer.concat(parts).subarray(0, 3000);
}

/** Files (name, fsync'd content) and the ids of the database rows committed. */
export interface Durable {
  files: Array<[string, Buffer]>;
  rows: number[];
}

/** What a recovered disk holds of a Durable. */
export interface Recovered {
  /** files missing or not byte-identical */
  differing: string[];
  /** ids of the rows in the database (none without one) */
  rows: number[];
  /** committed rows missing */
  missingRows: number[];
  /** rows present, committed or not, whose payload is not rowPayload(id) */
  wrongRows: number[];
  /** the database's PRAGMA integrity_check ('ok' without one) */
  integrity: string;
  /** e2fsck -fn after the mount replayed the journal and the unmount */
  fsck: { status: number | null; out: string };
}

/** Mounts the disk served at `uri` afresh under `dir` (the journal replays), reads, unmounts, fscks. */
export async function examineRecovered(dir: string, uri: string, want: Durable): Promise<Recovered> {
  const g = await GuestDisk.attach(dir, uri);
  try {
    const mnt = await g.mount();
    const differing: string[] = [];
    for (const [name, data] of want.files) {
      const got = await readFile(join(mnt, name)).catch(() => null);
      if (!got?.equals(data)) differing.push(name);
    }
    assert.ok((await readdir(mnt)).includes('lost+found'));
    const rows: number[] = [];
    const wrongRows: number[] = [];
    let integrity = 'ok';
    const db = join(mnt, 'test.db');
    if (existsSync(db)) {
      integrity = (await runAsync('sqlite3', [db, 'PRAGMA integrity_check;'])).out.trim();
      // a database whose CREATE TABLE never reached the disk has no table t: no rows
      const count = await runAsync('sqlite3', [db, "SELECT count(*) FROM sqlite_master WHERE name = 't';"]);
      if (count.out.trim() === '1') {
        const out = (await runAsync('sqlite3', [db, 'SELECT n, hex(v) FROM t ORDER BY n;'], { timeoutMs: 120_000 })).out;
        for (const line of out.split('\n')) {
          if (line === '') continue;
          const m = /^(\d+)\|([0-9A-F]*)$/.exec(line);
          assert.ok(m, `unexpected sqlite3 output: ${line.slice(0, 100)}`);
          const id = Number(m[1]);
          rows.push(id);
          if (!Buffer.from(m[2]!, 'hex').equals(rowPayload(id))) wrongRows.push(id);
        }
      }
    }
    const present = new Set(rows);
    const missingRows = want.rows.filter((id) => !present.has(id));
    await g.umount();
    return { differing, rows, missingRows, wrongRows, integrity, fsck: await g.fsck() };
  } finally {
    await g.detach();
  }
}

/** examineRecovered, and every file of `want` byte-identical, every committed row there with
 *  its payload, no row with another payload, the database and the filesystem clean. */
export async function checkRecovered(dir: string, uri: string, want: Durable): Promise<Recovered> {
  const r = await examineRecovered(dir, uri, want);
  assert.deepEqual(r.differing, [], `${r.differing.length} of the ${want.files.length} files fsync'd are missing or differ`);
  assert.equal(r.integrity, 'ok');
  assert.deepEqual(r.missingRows, [], `${r.missingRows.length} of the ${want.rows.length} rows committed are missing`);
  assert.deepEqual(r.wrongRows, [], 'rows whose payload is not the one written');
  assert.equal(r.fsck.status, 0, `e2fsck after the journal replay:\n${r.fsck.out}`);
  return r;
}
