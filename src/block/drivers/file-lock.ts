// Image locking for the file driver, with QEMU's permission model (src/util/native.ts): a
// writer holds consistent-read, write and resize and shares neither write nor resize, a
// reader holds consistent-read and shares the same; so writers exclude writers and readers,
// and readers coexist.
// Across processes, and against QEMU, the native helper takes QEMU's byte-range OFD locks
// when it is built. Within one process a table keyed by device and inode applies the same
// rules with the same messages, so two nodes of one process exclude each other even
// without the helper.

import type { FileHandle } from 'node:fs/promises';
import { findConflict, imagePerms, loadNative, type ImagePerms } from '../../util/native.js';

export interface ImageLock {
  /**
   * Moves the locks to `fh` (the reopened descriptor) with the permissions of `readOnly`.
   * On failure the old descriptor keeps its locks and the error says why.
   */
  reopen(fh: FileHandle, readOnly: boolean): Promise<void>;
  /** Drops the locks; call before closing the descriptor. */
  release(): Promise<void>;
}

interface Holder {
  perms: ImagePerms;
}
// One process's open images, like the kernel's lock table is one machine's: shared by every
// graph in the process on purpose, since they all open the same files.
const inProcess = new Map<string, Set<Holder>>();

function checkInProcess(holders: Set<Holder>, perms: ImagePerms, filename: string, self?: Holder): void {
  for (const h of holders) {
    if (h === self) continue;
    const e = findConflict(perms, h.perms, filename);
    if (e) throw e;
  }
}

export async function acquireImageLock(
  fh: FileHandle,
  filename: string,
  readOnly: boolean,
  forceShare = false,
): Promise<ImageLock> {
  const st = await fh.stat();
  const key = `${st.dev}:${st.ino}`;
  let found = inProcess.get(key);
  if (!found) inProcess.set(key, (found = new Set()));
  const holders = found;
  const perms = imagePerms(readOnly, forceShare);
  try {
    checkInProcess(holders, perms, filename);
  } catch (e) {
    if (holders.size === 0) inProcess.delete(key);
    throw e;
  }
  const native = loadNative();
  if (native) {
    try {
      native.lockImage(fh.fd, readOnly, filename, forceShare);
    } catch (e) {
      if (holders.size === 0) inProcess.delete(key);
      throw e;
    }
  }
  const me: Holder = { perms };
  holders.add(me);
  let fd = fh.fd;
  let ro = readOnly;
  let released = false;
  return {
    async reopen(nfh, nro) {
      const nperms = imagePerms(nro, forceShare && nro);
      checkInProcess(holders, nperms, filename, me);
      if (native) {
        // The old descriptor's locks would conflict with the new one's: drop them first and
        // put them back if the new descriptor cannot take its own.
        native.unlockImage(fd);
        try {
          native.lockImage(nfh.fd, nro, filename, forceShare && nro);
        } catch (e) {
          try {
            native.lockImage(fd, ro, filename, forceShare && ro);
          } catch {
            // someone took the image in between: the old descriptor stays unlocked
          }
          throw e;
        }
      }
      me.perms = nperms;
      fd = nfh.fd;
      ro = nro;
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
