// Image locking for the file driver, driven by the permissions the file node's parents hold
// and share (block/permissions.ts), as QEMU's file-posix does: a node nobody uses locks
// nothing; a writable qcow2 on it takes consistent-read, write and resize and shares neither
// write nor resize; a read-only one takes consistent-read and shares everything but write
// and resize; an export of a raw image takes what the export takes. When the parents change
// (an export added, a job started, a reopen), the locks follow.
// Across processes, and against QEMU, the native helper takes QEMU's byte-range OFD locks
// when it is built (100 + perm held, 200 + perm not shared). Within one process a table keyed
// by device and inode applies the same rules with the same messages, so two nodes of one
// process exclude each other even without the helper.

import type { FileHandle } from 'node:fs/promises';
import { findConflict, imagePerms, loadNative, type ImagePerms } from '../../util/native.js';
import { PERM_ALL } from '../permissions.js';
import type { PermChange } from '../driver.js';

export interface ImageLock {
  /**
   * Checks and takes the locks for `perms` (what the node's parents hold and share), keeping
   * the old ones too until commit() (QEMU's RAW_PL_PREPARE); abort() puts the old ones back.
   * Throws QEMU's "Failed to get "write" lock" when another user refuses.
   */
  prepare(perms: ImagePerms): PermChange;
  /** Moves the locks to `fh` (the reopened descriptor). */
  reopen(fh: FileHandle): Promise<void>;
  /** Drops the locks; call before closing the descriptor. */
  release(): Promise<void>;
}

interface Holder {
  perms: ImagePerms;
}
// One process's open images, like the kernel's lock table is one machine's: shared by every
// graph in the process on purpose, since they all open the same files.
const inProcess = new Map<string, Set<Holder>>();

function checkInProcess(holders: Set<Holder>, perms: ImagePerms, filename: string, self: Holder): void {
  for (const h of holders) {
    if (h === self) continue;
    const e = findConflict(perms, h.perms, filename);
    if (e) throw e;
  }
}

/** An image lock that holds nothing yet (a file node without parents). */
export async function openImageLock(fh: FileHandle, filename: string): Promise<ImageLock> {
  const st = await fh.stat();
  const key = `${st.dev}:${st.ino}`;
  let found = inProcess.get(key);
  if (!found) inProcess.set(key, (found = new Set()));
  const holders = found;
  const native = loadNative();
  const me: Holder = { perms: { perm: 0, shared: PERM_ALL } };
  holders.add(me);
  let fd = fh.fd;
  let released = false;
  const apply = (p: ImagePerms): void => native?.setLockBytes(fd, p.perm, PERM_ALL & ~p.shared, filename);
  return {
    prepare(next) {
      const old = me.perms;
      const noop = { commit: () => {}, abort: () => {} };
      if (released) return noop;
      checkInProcess(holders, next, filename, me);
      const widening = (next.perm | old.perm) !== old.perm || (old.shared & next.shared) !== old.shared;
      // the bytes held already are these (a refresh walking a deep chain asks again and
      // again): no lock call, as QEMU's raw_apply_lock_bytes changes only what differs
      if (next.perm === old.perm && next.shared === old.shared) return noop;
      if (native && widening) {
        // hold the union while checking, so nobody takes what either state needs meanwhile
        native.setLockBytes(fd, old.perm | next.perm, PERM_ALL & ~(old.shared & next.shared), filename);
        try {
          native.checkLockBytes(fd, next.perm, next.shared, filename);
        } catch (e) {
          apply(old);
          throw e;
        }
      }
      return {
        commit: () => {
          if (released) return;
          me.perms = next;
          try {
            apply(next);
          } catch {
            // dropping locks cannot conflict; a kernel refusal leaves more locked, never less
          }
        },
        abort: () => {
          if (released) return;
          try {
            apply(old);
          } catch {
            // as above
          }
        },
      };
    },
    async reopen(nfh) {
      if (released) return;
      // shared read locks: the new descriptor can take them while the old one holds them
      native?.setLockBytes(nfh.fd, me.perms.perm, PERM_ALL & ~me.perms.shared, filename);
      if (native) native.unlockImage(fd);
      fd = nfh.fd;
    },
    async release() {
      if (released) return;
      released = true;
      if (native) native.unlockImage(fd);
      holders.delete(me);
      if (holders.size === 0 && inProcess.get(key) === holders) inProcess.delete(key);
    },
  };
}

/**
 * Locks an image file for a fixed use outside the graph (blockdev-create's file): a writer
 * or a reader, as a format on it would. Throws QEMU's message on conflict.
 */
export async function acquireImageLock(fh: FileHandle, filename: string, readOnly: boolean, forceShare = false): Promise<ImageLock> {
  const lock = await openImageLock(fh, filename);
  try {
    lock.prepare(imagePerms(readOnly, forceShare)).commit();
  } catch (e) {
    await lock.release();
    throw e;
  }
  return lock;
}
