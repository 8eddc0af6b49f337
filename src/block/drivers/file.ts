// Protocol driver "file": a host file through a Node FileHandle.
// Options: filename (required), cache.direct (refused: Node cannot guarantee the aligned
// buffers O_DIRECT needs), cache.no-flush, aio (threads|native|io_uring, accepted: reads and
// FUA writes of up to 64 KiB go through the native helper's io_uring and larger ones through
// Node's fs and libuv's thread pool, whatever aio says; LOCKSTEP_IO_URING=on|off|auto in the
// environment forces all, none, or that default; with LOCKSTEP_SYNC_WRITES=on other writes
// of up to 64 KiB are a synchronous pwrite on the event loop while SyncWriteGate allows),
// locking
// (auto|on|off), aio-max-batch, pr-manager (refused), force-share (read-only only: share
// every permission).
//
// Locking (locking=auto|on): the image is locked with the same byte-range OFD locks QEMU
// takes when the native helper is built (src/util/native.ts), for the permissions the node's
// parents hold and share (block/permissions.ts: none while nothing uses the node), so QEMU
// and other lockstep processes are refused as QEMU would refuse them; within one process the
// same rules hold without the helper (see file-lock.ts).
//
// With the native helper the node also answers block status from SEEK_DATA/SEEK_HOLE (holes
// are data:false, zero:true), discards by punching holes, and writes zeroes by punching a
// hole (mayUnmap) or with fallocate(ZERO_RANGE), writing zero buffers where the filesystem
// refuses. Without it, everything is allocated data and the core emulates zeroing.
//
// FUA is native: a FUA write goes through a second descriptor opened with O_DSYNC, so it is
// stable when it completes without syncing the rest of the file (an fdatasync would first
// write back every dirty page of the file: a qcow2 make_empty orders its metadata this way
// without paying for the data it discards). With cache.no-flush FUA is ignored, as flushes are.
//
// Replacement (caps.replace, regular files): a fresh file is prepared beside this one
// (`.NAME.lockstep-spare`, written and synced there) and renamed over it on commit, so that
// qcow2's make_empty costs no sync at all (see qcow2/make-empty.ts).

import { constants as fsConstants, writeSync } from 'node:fs';
import { performance } from 'node:perf_hooks';
import { lstat, open as fsOpen, rename, statfs, unlink, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import {
  makeCaps,
  type BlockDriver,
  type BlockStatus,
  type NodeCaps,
  type NodeImpl,
  type PermChange,
  type PreparedReplacement,
  type WriteFlags,
  type ZeroFlags,
} from '../driver.js';
import { BlockError, InvalidArgumentError, isBlockError, strerror } from '../../errors.js';
import type { CacheOptions, GraphOpenContext } from '../graph.js';
import { loadNative, type NativeHelper, type RingIo } from '../../util/native.js';
import { openImageLock, type ImageLock } from './file-lock.js';
import type { Perms } from '../permissions.js';

/**
 * With LOCKSTEP_SYNC_WRITES=on (read when a node opens), writes up to this size (not FUA) are
 * one synchronous pwrite on the event loop: a buffered write into the page cache costs a few
 * microseconds, less than handing it to another thread (io_uring hands every buffered ext4
 * write to an io-wq worker, the fs path to libuv's pool), whose wake-up on a busy machine was
 * most of a 4 KiB write's cost (issue 18, NBD bench: 4 KiB random writes 1.32x). Off by
 * default: a write that sleeps (throttling, a stalled journal) stops the event loop for as
 * long, one request holding a turn for 10-200 ms or more, which issue 14 rules out; the gate
 * below bounds how often, not how long.
 */
const SYNC_WRITE_MAX = 64 * 1024;

/**
 * When a node may write synchronously. A pwrite can sleep: the kernel throttles a writer that
 * dirties pages faster than they are written back (pauses of 10-200 ms, one after another
 * while it lasts), and a stalled disk or journal holds it too; with the event loop stopped
 * that long, QMP, checkpoints and the lease would wait. A lone slow write is usually the
 * thread being preempted on a busy host (1-12 ms, a few per second at load 5 on 2 cores);
 * two within `windowMs` stop synchronous writes for `backoffMs`, twice as long each time it
 * happens again (up to `maxBackoffMs`), back to `backoffMs` after a quiet `maxBackoffMs`.
 * So the loop stops for at most two slow writes per back-off.
 */
export class SyncWriteGate {
  private until = 0;
  private lastSlow = -Infinity;
  private lastTrip = -Infinity;
  private backoff: number;

  constructor(
    readonly slowMs = 10,
    readonly windowMs = 1000,
    readonly backoffMs = 1000,
    readonly maxBackoffMs = 60_000,
  ) {
    this.backoff = backoffMs;
  }

  /** whether a write may be synchronous at `now` (ms, performance.now()) */
  allowed(now: number): boolean {
    return now >= this.until;
  }

  /** Records a synchronous write that ran from `start` to `end`. */
  record(start: number, end: number): void {
    if (end - start <= this.slowMs) return;
    if (end - this.lastSlow <= this.windowMs) {
      if (end - this.lastTrip > this.maxBackoffMs) this.backoff = this.backoffMs;
      this.until = end + this.backoff;
      this.lastTrip = this.until;
      this.backoff = Math.min(this.backoff * 2, this.maxBackoffMs);
      this.lastSlow = -Infinity;
      return;
    }
    this.lastSlow = end;
  }
}

function syncWritesEnabled(): boolean {
  const v = process.env.LOCKSTEP_SYNC_WRITES;
  return v === 'on' || v === '1';
}

/** Largest zero buffer written at once where the filesystem cannot zero a range itself. */
const ZERO_CHUNK = 1024 * 1024;

async function openHandle(filename: string, readOnly: boolean): Promise<FileHandle> {
  try {
    return await fsOpen(filename, readOnly ? 'r' : 'r+');
  } catch (e) {
    throw new InvalidArgumentError(`Could not open '${filename}': ${strerror(e)}`);
  }
}

/** statfs f_type of procfs: its files have no length (lseek to the end fails) */
const PROC_SUPER_MAGIC = 0x9fa0;

/**
 * The file's length, refusing what QEMU's file driver refuses: anything but a regular file
 * or a block device (a directory, a FIFO), and procfs files, whose length cannot be read
 * (/proc/self/mem would otherwise read as an empty or endless disk).
 */
async function checkedSize(fh: FileHandle, filename: string): Promise<number> {
  const st = await fh.stat();
  if (!st.isFile() && !st.isBlockDevice()) {
    throw new InvalidArgumentError(`'file' driver requires '${filename}' to be a regular file`);
  }
  if (st.isFile() && (await statfs(filename).catch(() => null))?.type === PROC_SUPER_MAGIC) {
    throw new InvalidArgumentError('Could not refresh total sector count: Invalid argument');
  }
  return st.size;
}

export const fileDriver: BlockDriver = {
  name: 'file',
  kind: 'protocol',
  async open(ctx, o): Promise<NodeImpl> {
    const filename = o.string('filename', true);
    const locking = o.enumOf('locking', ['auto', 'on', 'off']) ?? 'auto';
    o.enumOf('aio', ['threads', 'native', 'io_uring']);
    o.uint('aio-max-batch');
    o.bool('drop-cache');
    o.bool('x-check-cache-dropped');
    if (o.has('pr-manager')) throw new InvalidArgumentError(`Parameter 'pr-manager' is not supported by lockstep`);
    const forceShare = o.bool('force-share') ?? false;
    o.done();
    const cache = (ctx as GraphOpenContext).cache ?? { direct: false, noFlush: false };
    if (cache.direct) {
      throw new InvalidArgumentError(
        `cache.direct=on is not supported: lockstep cannot guarantee the aligned buffers O_DIRECT needs; use cache.direct=off`,
      );
    }
    const readOnly = ctx.readOnly;
    if (forceShare && !readOnly) throw new InvalidArgumentError('force-share=on can only be used with read-only images');
    const native = loadNative();
    const fh = await openHandle(filename, readOnly);
    let size: number;
    try {
      size = await checkedSize(fh, filename);
    } catch (e) {
      await fh.close();
      throw e;
    }
    let lock: ImageLock | null = null;
    let regular = false;
    try {
      regular = (await fh.stat()).isFile();
      if (locking !== 'off') lock = await openImageLock(fh, filename);
    } catch (e) {
      await fh.close();
      throw e;
    }
    return new FileNode(filename, cache, native, fh, size, lock, readOnly, regular);
  },
};

/** The state of an open file node: its descriptors, lock, length and what it learned. */
class FileNode implements NodeImpl {
  readonly caps: NodeCaps;
  // reads and writes through io_uring when LOCKSTEP_IO_URING allows (auto: up to 64 KiB): same bytes as fs
  private readonly ring: RingIo | null;
  // the O_DSYNC descriptor for FUA writes, opened at the first one
  private syncFh: Promise<FileHandle> | null = null;
  // what the lock holds now: a prepared replacement takes the same
  private heldPerms: Perms | null = null;

  // ---- replacement (qcow2 make_empty's swap path) -----------------------------------------
  // A fresh file is written and made stable beside this one, then renamed over it: a crash
  // leaves the old file or the new one. The old inode is freed when its descriptors close
  // (its dirty pages are dropped unwritten). Only for a regular file that the filename names
  // directly (no symlink, no other hard link: those would keep the old content).
  private readonly sparePath: string;
  private outstanding: PreparedReplacement | null = null;
  // the rename is made stable by the next flush (or FUA write), before it reports anything
  // the new file holds as stable
  private replacements = 0;
  private dirSynced = 0;
  // the directory, opened once at the first preparation (a descriptor, so that a directory
  // renamed or removed later can still be synced)
  private dirFh: FileHandle | null = null;

  // Learned once per node, like QEMU's has_write_zeroes/has_discard: a filesystem that
  // refused a fallocate mode refuses it for good.
  private canPunch = true;
  private canZeroRange = true;
  // small writes on the event loop while the gate allows (null: LOCKSTEP_SYNC_WRITES not on)
  private readonly syncGate = syncWritesEnabled() ? new SyncWriteGate() : null;

  constructor(
    readonly filename: string,
    private readonly cache: CacheOptions,
    private readonly native: NativeHelper | null,
    private fh: FileHandle,
    private size: number,
    private lock: ImageLock | null,
    private readOnly: boolean,
    regular: boolean,
  ) {
    this.ring = native?.ring ?? null;
    this.sparePath = join(dirname(filename), `.${basename(filename)}.lockstep-spare`);
    this.caps = makeCaps({
      fua: true,
      writeZeroes: native !== null,
      discard: native !== null,
      blockStatus: native !== null,
      truncate: true,
      growable: true,
      replace: regular,
    });
  }

  getLength(): number {
    return this.size;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    // not pooled (allocUnsafe shares small buffers): the caller owns a buffer of its own
    const buf = Buffer.allocUnsafeSlow(length);
    await this.readInto(offset, buf);
    return buf;
  }

  // Fills all of buf: what the file holds, zeroes past its end. The buffer is never
  // zero-filled first (a 64 KiB memset per request), only the part past EOF is.
  async readInto(offset: number, buf: Buffer): Promise<void> {
    const length = buf.length;
    let done = 0;
    try {
      while (done < length) {
        const viaRing = this.ring?.read(this.fh.fd, done === 0 ? buf : buf.subarray(done), offset + done);
        const n = viaRing ? await viaRing : (await this.fh.read(buf, done, length - done, offset + done)).bytesRead;
        if (n === 0) break;
        done += n;
      }
    } catch (e) {
      throw BlockError.fromSystem(e, `read from ${this.filename}`);
    }
    if (done < length) buf.fill(0, done);
  }

  private async closeSyncFh(): Promise<void> {
    const p = this.syncFh;
    this.syncFh = null;
    if (p) await (await p.catch(() => null))?.close();
  }

  private async syncDirAfterReplace(): Promise<void> {
    const gen = this.replacements;
    if (gen === this.dirSynced || this.cache.noFlush || !this.dirFh) return;
    await this.dirFh.sync();
    this.dirSynced = Math.max(this.dirSynced, gen);
  }

  async prepareReplacement(content: Buffer): Promise<PreparedReplacement> {
    const { filename, sparePath } = this;
    if (this.outstanding) await this.outstanding.discard();
    const [st, lst] = await Promise.all([this.fh.stat(), lstat(filename).catch(() => null)]);
    if (!st.isFile() || !lst || !lst.isFile() || lst.ino !== st.ino || lst.dev !== st.dev || st.nlink !== 1) {
      throw new BlockError('ENOTSUP', `${filename} cannot be replaced: not a regular file named by this path only`);
    }
    let sfh: FileHandle;
    try {
      if (!this.cache.noFlush) this.dirFh ??= await fsOpen(dirname(filename), 'r');
      sfh = await fsOpen(sparePath, 'w+', st.mode & 0o7777);
    } catch (e) {
      throw BlockError.fromSystem(e, `create ${sparePath}`);
    }
    let slock: ImageLock | null = null;
    try {
      await sfh.chmod(st.mode & 0o7777);
      await sfh.chown(st.uid, st.gid).catch(() => undefined);
      let done = 0;
      while (done < content.length) {
        const { bytesWritten } = await sfh.write(content, done, content.length - done, done);
        done += bytesWritten;
      }
      if (!this.cache.noFlush) await sfh.datasync();
      // the spare takes over the locks the node holds now (its users' permissions)
      if (this.lock) {
        slock = await openImageLock(sfh, filename);
        if (this.heldPerms) slock.prepare(this.heldPerms).commit();
      }
    } catch (e) {
      await sfh.close().catch(() => undefined);
      await unlink(sparePath).catch(() => undefined);
      throw BlockError.fromSystem(e, `write ${sparePath}`);
    }
    let used = false;
    const discard = async (): Promise<void> => {
      if (used) return;
      used = true;
      if (this.outstanding === r) this.outstanding = null;
      await slock?.release();
      await sfh.close().catch(() => undefined);
      await unlink(sparePath).catch(() => undefined);
    };
    const r: PreparedReplacement = {
      commit: async () => {
        if (used) throw new BlockError('EINVAL', `${sparePath} was already used or removed`);
        if (this.readOnly) throw new BlockError('EPERM', `${filename} is read-only`);
        try {
          await rename(sparePath, filename);
        } catch (e) {
          await discard();
          throw BlockError.fromSystem(e, `rename ${sparePath} to ${filename}`);
        }
        used = true;
        this.outstanding = null;
        const oldFh = this.fh;
        const oldLock = this.lock;
        const oldSync = this.syncFh;
        this.fh = sfh;
        this.lock = slock;
        this.syncFh = null;
        this.size = content.length;
        this.replacements++;
        // the old inode: locks first, then its descriptors (the last close frees it)
        void (async () => {
          await oldLock?.release();
          await (await oldSync?.catch(() => null))?.close();
          await oldFh.close();
        })().catch(() => undefined);
      },
      discard,
    };
    this.outstanding = r;
    return r;
  }

  async write(offset: number, data: Buffer, flags?: WriteFlags): Promise<void> {
    const fua = (flags?.fua ?? false) && !this.cache.noFlush;
    const gate = this.syncGate;
    if (gate && !fua && data.length <= SYNC_WRITE_MAX && gate.allowed(performance.now())) {
      this.writeNow(offset, data, gate);
      return;
    }
    const { ring } = this;
    let done = 0;
    try {
      let target = this.fh;
      if (fua) {
        await this.syncDirAfterReplace();
        this.syncFh ??= fsOpen(this.filename, fsConstants.O_RDWR | fsConstants.O_DSYNC);
        target = await this.syncFh.catch((e: unknown) => {
          this.syncFh = null;
          throw e;
        });
      }
      while (done < data.length) {
        const viaRing = ring?.write(target.fd, done === 0 ? data : data.subarray(done), offset + done);
        done += viaRing ? await viaRing : (await target.write(data, done, data.length - done, offset + done)).bytesWritten;
      }
    } catch (e) {
      throw BlockError.fromSystem(e, `write to ${this.filename}`);
    }
    if (offset + data.length > this.size) this.size = offset + data.length;
  }

  /** One synchronous pwrite (see SYNC_WRITE_MAX), timed for the gate. */
  private writeNow(offset: number, data: Buffer, gate: SyncWriteGate): void {
    const t0 = performance.now();
    let done = 0;
    try {
      while (done < data.length) done += writeSync(this.fh.fd, data, done, data.length - done, offset + done);
    } catch (e) {
      throw BlockError.fromSystem(e, `write to ${this.filename}`);
    } finally {
      gate.record(t0, performance.now());
    }
    if (offset + data.length > this.size) this.size = offset + data.length;
  }

  private async writeZeroBuffers(offset: number, length: number): Promise<void> {
    const zeroes = Buffer.alloc(Math.min(length, ZERO_CHUNK));
    for (let pos = offset; pos < offset + length; pos += zeroes.length) {
      await this.write(pos, zeroes.subarray(0, Math.min(zeroes.length, offset + length - pos)));
    }
  }

  private async punch(offset: number, length: number): Promise<boolean> {
    if (!this.native || !this.canPunch) return false;
    try {
      await this.native.punchHole(this.fh.fd, offset, length);
      return true;
    } catch (e) {
      if (!isBlockError(e, 'ENOTSUP')) throw e;
      this.canPunch = false;
      return false;
    }
  }

  private async zeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    const end = offset + length;
    // a punched hole never grows the file: the part past EOF is zeroed below
    const inside = Math.min(end, this.size);
    let from = offset;
    if (flags.mayUnmap && inside > offset && (await this.punch(offset, inside - offset))) from = inside;
    if (from >= end) return;
    if (this.native && this.canZeroRange) {
      try {
        await this.native.zeroRange(this.fh.fd, from, end - from);
        if (end > this.size) this.size = end;
        return;
      } catch (e) {
        if (!isBlockError(e, 'ENOTSUP')) throw e;
        this.canZeroRange = false;
      }
    }
    if (flags.noFallback) throw new BlockError('ENOTSUP', `${this.filename}: the filesystem cannot zero a range`);
    await this.writeZeroBuffers(from, end - from);
  }

  async writeZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    await this.zeroes(offset, length, flags);
    // fallocate and punched holes are metadata: FUA needs the whole-file sync here
    if (flags.fua && !this.cache.noFlush) await this.datasync();
  }

  async discard(offset: number, length: number): Promise<void> {
    const end = Math.min(offset + length, this.size);
    if (end > offset) await this.punch(offset, end - offset); // advisory: a refusal is fine
  }

  private async datasync(): Promise<void> {
    try {
      await this.syncDirAfterReplace();
      await this.fh.datasync();
    } catch (e) {
      throw BlockError.fromSystem(e, `flush of ${this.filename}`);
    }
  }

  async flush(): Promise<void> {
    if (this.cache.noFlush) return;
    await this.datasync();
  }

  // QEMU's find_allocation: one lseek(SEEK_DATA), and lseek(SEEK_HOLE) when in data.
  async blockStatus(offset: number, length: number): Promise<BlockStatus> {
    const { native } = this;
    if (!native) return { length, allocated: true, data: true, zero: false };
    const end = offset + length;
    let data = true;
    let runEnd = end;
    try {
      const d = native.seekData(this.fh.fd, offset);
      if (d === -1 || d > offset) {
        data = false; // a hole up to the next data, or to EOF
        if (d !== -1) runEnd = Math.min(d, end);
      } else if (d === offset) {
        const h = native.seekHole(this.fh.fd, offset);
        if (h > offset) runEnd = Math.min(h, end);
        // h <= offset: the file changed between the two calls; report data, which is safe
      }
    } catch {
      // the filesystem cannot tell: everything is data, as QEMU reports it
    }
    // no `file`: a protocol node holds its own bytes, and naming itself would invite callers
    // that descend into `file` to loop
    return { length: runEnd - offset, allocated: true, data, zero: !data, hostOffset: offset };
  }

  async truncate(length: number): Promise<void> {
    try {
      await this.fh.truncate(length);
    } catch (e) {
      throw BlockError.fromSystem(e, `truncate of ${this.filename}`);
    }
    this.size = length;
  }

  async reopen(ro: boolean): Promise<void> {
    if (ro === this.readOnly) return;
    if (this.outstanding) await this.outstanding.discard();
    const nfh = await openHandle(this.filename, ro);
    try {
      if (this.lock) await this.lock.reopen(nfh);
    } catch (e) {
      await nfh.close();
      throw e;
    }
    const old = this.fh;
    this.fh = nfh;
    this.readOnly = ro;
    await old.close();
    await this.closeSyncFh();
  }

  preparePerms(perms: Perms): PermChange {
    const lock = this.lock;
    if (!lock) return { commit: () => {}, abort: () => {} };
    const change = lock.prepare(perms);
    return {
      commit: () => {
        change.commit();
        this.heldPerms = perms;
      },
      abort: () => change.abort(),
    };
  }

  async close(): Promise<void> {
    if (this.outstanding) await this.outstanding.discard();
    await this.dirFh?.close().catch(() => undefined);
    if (this.lock) await this.lock.release();
    await this.closeSyncFh();
    await this.fh.close();
  }

  info(): Record<string, unknown> {
    return { filename: this.filename };
  }
}
