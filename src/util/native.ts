// Optional native helper (native/lockstep_native.c): fcntl OFD locks, lseek SEEK_DATA/
// SEEK_HOLE and fallocate, which Node.js does not expose. lockstep works without it; when it
// is built, the file driver uses it for QEMU-compatible image locking, sparse-file block
// status and fast discard/write-zeroes. LOCKSTEP_NATIVE=off in the environment disables it.
//
// Image locking follows QEMU's file-posix protocol, so QEMU and lockstep see each other's
// locks: one shared (F_RDLCK) Open File Description lock on byte 100 + i for each permission
// i the opener holds, and on byte 200 + i for each permission it does not share with others.
// Before keeping its locks an opener tests (F_OFD_GETLK, exclusive) byte 200 + i for every
// permission it wants and byte 100 + i for every permission it refuses to share. OFD locks
// belong to the open file description, so two opens in one process exclude each other too.

import { createRequire } from 'node:module';
import { constants as osConstants } from 'node:os';
import { fileURLToPath } from 'node:url';
import { BlockError, InvalidArgumentError, isErrorCode, strerrorOf, type ErrorCode } from '../errors.js';

/** QEMU's permission bits (BLK_PERM_*), in lock-byte order. */
export const PERM = { CONSISTENT_READ: 1, WRITE: 2, WRITE_UNCHANGED: 4, RESIZE: 8 } as const;
const PERM_COUNT = 4;
const PERM_NAMES = ['consistent read', 'write', 'write unchanged', 'resize'] as const;
const ALL_PERMS = (1 << PERM_COUNT) - 1;
const LOCK_PERM_BASE = 100;
const LOCK_SHARED_BASE = 200;

export interface ImagePerms {
  /** permissions this open holds */
  perm: number;
  /** permissions this open lets others hold */
  shared: number;
}

/**
 * What a lockstep open of an image file holds and shares: the same as QEMU's qcow2 (or a
 * guest device) on its file node, because a format on top may rewrite metadata and grow the
 * file. Writers exclude writers and readers; readers coexist with readers. force-share
 * (read-only only) shares everything, like qemu-img -U.
 */
export function imagePerms(readOnly: boolean, forceShare = false): ImagePerms {
  const perm = readOnly ? PERM.CONSISTENT_READ : PERM.CONSISTENT_READ | PERM.WRITE | PERM.RESIZE;
  const shared = forceShare ? ALL_PERMS : PERM.CONSISTENT_READ | PERM.WRITE_UNCHANGED;
  return { perm, shared };
}

/** QEMU's refusal, word for word: `held` is true when the other side holds `bit`. */
export function lockConflict(filename: string, bit: number, held: boolean): InvalidArgumentError {
  const name = PERM_NAMES[Math.log2(bit)] ?? 'unknown';
  return new InvalidArgumentError(
    `Failed to get ${held ? 'shared ' : ''}"${name}" lock\nIs another process using the image [${filename}]?`,
  );
}

/**
 * The first conflict between `mine` and another opener's permissions, checked in QEMU's order
 * (the permissions I want, then the ones I refuse to share), or null.
 */
export function findConflict(mine: ImagePerms, other: ImagePerms, filename: string): InvalidArgumentError | null {
  for (let i = 0; i < PERM_COUNT; i++) {
    const bit = 1 << i;
    if (mine.perm & bit && !(other.shared & bit)) return lockConflict(filename, bit, false);
  }
  for (let i = 0; i < PERM_COUNT; i++) {
    const bit = 1 << i;
    if (!(mine.shared & bit) && other.perm & bit) return lockConflict(filename, bit, true);
  }
  return null;
}

export interface NativeHelper {
  /**
   * Takes QEMU's image locks on fd (a freshly opened descriptor). Throws InvalidArgumentError
   * with QEMU's message on conflict; on any failure fd is left without locks.
   */
  lockImage(fd: number, readOnly: boolean, filename: string, forceShare?: boolean): void;
  /** Drops every image lock fd holds (closing the descriptor drops them too). */
  unlockImage(fd: number): void;
  /**
   * QEMU's raw_apply_lock_bytes: fd holds the lock byte 100 + i for each permission in
   * `perm` and 200 + i for each one in `unshared`, and no other image lock byte. Throws
   * InvalidArgumentError ("Failed to lock byte N") when the kernel refuses.
   */
  setLockBytes(fd: number, perm: number, unshared: number, filename: string): void;
  /**
   * QEMU's raw_check_lock_bytes: throws QEMU's "Failed to get ... lock" when another open
   * file description holds a lock byte that refuses `perm` or takes what `shared` omits.
   */
  checkLockBytes(fd: number, perm: number, shared: number, filename: string): void;
  /** lseek(SEEK_DATA): the first data byte at or after offset, or -1 when none (ENXIO) */
  seekData(fd: number, offset: number): number;
  /** lseek(SEEK_HOLE): the first hole byte at or after offset (EOF counts as a hole) */
  seekHole(fd: number, offset: number): number;
  /** fallocate(PUNCH_HOLE | KEEP_SIZE); BlockError ENOTSUP where the filesystem refuses */
  punchHole(fd: number, offset: number, length: number): Promise<void>;
  /** fallocate(ZERO_RANGE), growing the file if the range ends past EOF; ENOTSUP as above */
  zeroRange(fd: number, offset: number, length: number): Promise<void>;
  /** file reads and writes through io_uring (see RING_AUTO_MAX), null when LOCKSTEP_IO_URING=off */
  readonly ring: RingIo | null;
}

/**
 * pread/pwrite submitted to io_uring instead of libuv's thread pool: a read the page cache
 * answers completes inside the call, with no thread hop. Each call returns null when the ring
 * cannot take the request (io_uring refused by the kernel, every slot in flight): the caller
 * then does it through Node's fs, which gives the same bytes.
 */
export interface RingIo {
  /** bytes read (fewer at EOF, 0 past it); rejects with an Error carrying an errno `code`, as fs does */
  read(fd: number, buf: Buffer, offset: number): Promise<number> | null;
  /** bytes written (possibly fewer: the caller writes the rest); rejects as read does */
  write(fd: number, buf: Buffer, offset: number): Promise<number> | null;
}

/** The addon's raw exports (native/lockstep_native.c). Calls return a negative errno. */
interface Addon {
  ofdLock(fd: number, byte: number, type: 0 | 1): number;
  ofdTest(fd: number, byte: number): number;
  seek(fd: number, offset: number, hole: boolean): number;
  fallocate(fd: number, mode: number, offset: number, length: number): Promise<number>;
  FALLOC_FL_KEEP_SIZE: number;
  FALLOC_FL_PUNCH_HOLE: number;
  FALLOC_FL_ZERO_RANGE: number;
  /** absent in an addon built before io_uring support */
  uringRead?(fd: number, buf: Buffer, offset: number): Promise<number> | null;
  uringWrite?(fd: number, buf: Buffer, offset: number): Promise<number> | null;
  /** absent in an addon built before them; negative errno on failure */
  threadCpuNs?(): number;
  turnCpuStart?(resolutionMs: number): number;
  /** [count, meanNs, p50Ns, p99Ns, p999Ns, maxNs], null when not started */
  turnCpuRead?(reset: boolean): number[] | null;
  turnCpuStop?(): void;
}

const ERRNO_NAMES = new Map<number, string>();
for (const [name, n] of Object.entries(osConstants.errno)) {
  // EOPNOTSUPP and ENOTSUP share a number on Linux; lockstep's code is ENOTSUP
  if (!ERRNO_NAMES.has(n) || name === 'ENOTSUP') ERRNO_NAMES.set(n, name);
}
const ENXIO = osConstants.errno.ENXIO;

// QEMU's translate_err: "this call is not supported here" comes in several spellings
const NOT_SUPPORTED = new Set(['ENOTSUP', 'EOPNOTSUPP', 'ENOSYS', 'ENODEV', 'ENOTTY']);

function errnoText(negErrno: number): { code: ErrorCode; text: string } {
  let name = ERRNO_NAMES.get(-negErrno) ?? `errno ${-negErrno}`;
  if (NOT_SUPPORTED.has(name)) name = 'ENOTSUP';
  return { code: isErrorCode(name) ? name : 'EIO', text: strerrorOf(name) ?? name };
}

function errnoError(negErrno: number, context: string): BlockError {
  const { code, text } = errnoText(negErrno);
  return new BlockError(code, `${context}: ${text}`);
}

/** An error shaped like Node's fs errors (code), so callers word it as they word those. */
function systemError(negErrno: number): Error {
  const { code, text } = errnoText(negErrno);
  return Object.assign(new Error(text), { code });
}

/** Largest request the ring takes by default (LOCKSTEP_IO_URING unset or auto). */
export const RING_AUTO_MAX = 64 * 1024;

/**
 * LOCKSTEP_IO_URING: off (or 0) never uses the ring, on (or 1) uses it for every request,
 * unset or auto for requests up to RING_AUTO_MAX bytes.
 */
function ringModeOf(v: string | undefined): 'off' | 'on' | 'auto' {
  if (v === undefined || v === '' || v === 'auto') return 'auto';
  if (v === 'on' || v === '1') return 'on';
  if (v === 'off' || v === '0') return 'off';
  throw new InvalidArgumentError(`LOCKSTEP_IO_URING must be on, off or auto, not '${v}'`);
}

function wrap(addon: Addon, ringMode: 'off' | 'on' | 'auto'): NativeHelper {
  const unlockAll = (fd: number): void => {
    for (let i = 0; i < PERM_COUNT; i++) {
      addon.ofdLock(fd, LOCK_PERM_BASE + i, 0);
      addon.ofdLock(fd, LOCK_SHARED_BASE + i, 0);
    }
  };
  const fail = (fd: number, e: Error): never => {
    unlockAll(fd);
    throw e;
  };
  const hint = (filename: string): string => `\nIs another process using the image [${filename}]?`;
  const uRead = addon.uringRead;
  const uWrite = addon.uringWrite;
  // auto: small requests only. A page-cache read completes inside the submitting call and a
  // small write skips the thread pool's wake-up; large ones were slower through the ring than
  // through the thread pool (NBD bench, docs/benchmarks.md, issue 18), so they return null and
  // the caller does them through Node's fs, which gives the same bytes.
  const maxRing = ringMode === 'on' ? Infinity : RING_AUTO_MAX;
  const ring: RingIo | null =
    ringMode === 'off' || !uRead || !uWrite
      ? null
      : {
          read(fd, buf, offset) {
            if (buf.length > maxRing) return null;
            const p = uRead(fd, buf, offset);
            return p && p.then((r) => (r < 0 ? Promise.reject(systemError(r)) : r));
          },
          write(fd, buf, offset) {
            if (buf.length > maxRing) return null;
            const p = uWrite(fd, buf, offset);
            return p && p.then((r) => (r < 0 ? Promise.reject(systemError(r)) : r));
          },
        };

  return {
    ring,
    lockImage(fd, readOnly, filename, forceShare = false) {
      const { perm, shared } = imagePerms(readOnly, forceShare);
      const want: number[] = [];
      for (let i = 0; i < PERM_COUNT; i++) if (perm & (1 << i)) want.push(LOCK_PERM_BASE + i);
      for (let i = 0; i < PERM_COUNT; i++) if (!(shared & (1 << i))) want.push(LOCK_SHARED_BASE + i);
      for (const byte of want) {
        const r = addon.ofdLock(fd, byte, 1);
        if (r < 0) fail(fd, new InvalidArgumentError(`Failed to lock byte ${byte}: ${errnoText(r).text}${hint(filename)}`));
      }
      const test = (byte: number): boolean => {
        const r = addon.ofdTest(fd, byte);
        if (r < 0) fail(fd, new InvalidArgumentError(`Failed to check byte ${byte}: ${errnoText(r).text}${hint(filename)}`));
        return r === 1;
      };
      for (let i = 0; i < PERM_COUNT; i++) {
        const bit = 1 << i;
        if (perm & bit && test(LOCK_SHARED_BASE + i)) fail(fd, lockConflict(filename, bit, false));
      }
      for (let i = 0; i < PERM_COUNT; i++) {
        const bit = 1 << i;
        if (!(shared & bit) && test(LOCK_PERM_BASE + i)) fail(fd, lockConflict(filename, bit, true));
      }
    },
    unlockImage: unlockAll,
    setLockBytes(fd, perm, unshared, filename) {
      for (let i = 0; i < PERM_COUNT; i++) {
        for (const [base, set] of [[LOCK_PERM_BASE, perm], [LOCK_SHARED_BASE, unshared]] as const) {
          const byte = base + i;
          const r = addon.ofdLock(fd, byte, set & (1 << i) ? 1 : 0);
          if (r < 0) throw new InvalidArgumentError(`Failed to lock byte ${byte}: ${errnoText(r).text}${hint(filename)}`);
        }
      }
    },
    checkLockBytes(fd, perm, shared, filename) {
      const test = (byte: number): boolean => {
        const r = addon.ofdTest(fd, byte);
        if (r < 0) throw new InvalidArgumentError(`Failed to check byte ${byte}: ${errnoText(r).text}${hint(filename)}`);
        return r === 1;
      };
      for (let i = 0; i < PERM_COUNT; i++) {
        const bit = 1 << i;
        if (perm & bit && test(LOCK_SHARED_BASE + i)) throw lockConflict(filename, bit, false);
      }
      for (let i = 0; i < PERM_COUNT; i++) {
        const bit = 1 << i;
        if (!(shared & bit) && test(LOCK_PERM_BASE + i)) throw lockConflict(filename, bit, true);
      }
    },
    seekData(fd, offset) {
      const r = addon.seek(fd, offset, false);
      if (r === -ENXIO) return -1;
      if (r < 0) throw errnoError(r, `lseek(SEEK_DATA) at ${offset}`);
      return r;
    },
    seekHole(fd, offset) {
      const r = addon.seek(fd, offset, true);
      if (r < 0) throw errnoError(r, `lseek(SEEK_HOLE) at ${offset}`);
      return r;
    },
    async punchHole(fd, offset, length) {
      const mode = addon.FALLOC_FL_PUNCH_HOLE | addon.FALLOC_FL_KEEP_SIZE;
      const r = await addon.fallocate(fd, mode, offset, length);
      if (r < 0) throw errnoError(r, `punching a hole at ${offset}+${length}`);
    },
    async zeroRange(fd, offset, length) {
      const r = await addon.fallocate(fd, addon.FALLOC_FL_ZERO_RANGE, offset, length);
      if (r < 0) throw errnoError(r, `zeroing ${offset}+${length}`);
    },
  };
}

export const ADDON_PATH = fileURLToPath(new URL('../../../native/build/Release/lockstep_native.node', import.meta.url));

interface LoadResult {
  helper: NativeHelper | null;
  reason: string | null;
  addon?: Addon;
}
// A read-only capability of this process (the addon file and the environment), cached once.
let loaded: LoadResult | undefined;

function load(): LoadResult {
  if (loaded) return loaded;
  const setting = process.env.LOCKSTEP_NATIVE;
  if (setting === 'off' || setting === '0') {
    loaded = { helper: null, reason: `disabled by LOCKSTEP_NATIVE=${setting}` };
  } else if (process.platform !== 'linux') {
    loaded = { helper: null, reason: `not available on ${process.platform}` };
  } else {
    // a bad LOCKSTEP_IO_URING is the user's error, thrown to every caller (not cached)
    const ringMode = ringModeOf(process.env.LOCKSTEP_IO_URING);
    try {
      const addon = createRequire(import.meta.url)(ADDON_PATH) as Addon;
      loaded = { helper: wrap(addon, ringMode), reason: null, addon };
    } catch (e) {
      const notBuilt = (e as { code?: string }).code === 'MODULE_NOT_FOUND';
      loaded = {
        helper: null,
        reason: notBuilt
          ? 'not built (npm install builds it; or run npm run build:native)'
          : `cannot load ${ADDON_PATH}: ${(e as Error).message.split('\n')[0]}`,
      };
    }
  }
  return loaded;
}

/** The native helper, or null when it is not built (or disabled). */
export function loadNative(): NativeHelper | null {
  return load().helper;
}

/** Why loadNative() returns null (for messages and tests), or null when it is loaded. */
export function nativeUnavailableReason(): string | null {
  return load().reason;
}

/**
 * The calling thread's CPU clock (CLOCK_THREAD_CPUTIME_ID) in ns, from the native helper:
 * the time the thread itself ran, which waiting for a CPU (preemption) does not add to.
 * Node 20 has no such call (process.cpuUsage counts every thread of the process, V8's GC
 * helpers and libuv's pool included), so without the helper there is none: null, and
 * threadCpuUnavailableReason() says why.
 */
export function threadCpuClock(): (() => number) | null {
  const f = load().addon?.threadCpuNs;
  if (!f || f() < 0) return null;
  return () => f();
}

/** Why threadCpuClock() and turnCpuHistogram() return null, or null when they do not. */
export function threadCpuUnavailableReason(): string | null {
  const r = load();
  if (!r.addon) return `the native helper is ${r.reason ?? 'not loaded'}`;
  if (!r.addon.threadCpuNs || !r.addon.turnCpuStart) return 'the native helper was built before threadCpuNs (npm run build:native)';
  const v = r.addon.threadCpuNs();
  return v < 0 ? `clock_gettime(CLOCK_THREAD_CPUTIME_ID): ${errnoText(v).text}` : null;
}

export interface TurnCpuFigures {
  count: number;
  meanNs: number;
  p50Ns: number;
  p99Ns: number;
  p999Ns: number;
  maxNs: number;
}

/**
 * A histogram of the CPU time the event loop's thread consumed per interval of a timer of
 * `resolutionMs` (native/lockstep_native.c: the timer and the clock readings are in C, no
 * JavaScript per tick). One per process; starting it again empties it. null without the
 * helper (threadCpuUnavailableReason() says why).
 */
export function turnCpuHistogram(resolutionMs: number): { read(reset: boolean): TurnCpuFigures; stop(): void } | null {
  const a = load().addon;
  if (!a?.turnCpuStart || !a.turnCpuRead || !a.turnCpuStop || a.turnCpuStart(resolutionMs) < 0) return null;
  const { turnCpuRead, turnCpuStop } = a;
  return {
    read(reset) {
      const v = turnCpuRead(reset) ?? [0, 0, 0, 0, 0, 0];
      return { count: v[0]!, meanNs: v[1]!, p50Ns: v[2]!, p99Ns: v[3]!, p999Ns: v[4]!, maxNs: v[5]! };
    },
    stop: () => turnCpuStop(),
  };
}
