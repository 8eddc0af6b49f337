// Image locking for the file driver. Two lockstep writers must never open one image.
// Within one process a table keyed by device and inode enforces it; across processes (and
// against QEMU) the native helper takes QEMU's byte-range OFD locks when it is built.

import type { FileHandle } from 'node:fs/promises';
import { InvalidArgumentError } from '../../errors.js';
import { loadNative } from '../../util/native.js';

export interface ImageLock {
  reopen(fh: FileHandle, readOnly: boolean): Promise<void>;
  release(): Promise<void>;
}

interface Holder {
  readOnly: boolean;
}
const inProcess = new Map<string, Set<Holder>>();

function conflict(filename: string, wantWrite: boolean): never {
  throw new InvalidArgumentError(
    `Failed to get "${wantWrite ? 'write' : 'consistent read'}" lock\nIs another process using the image [${filename}]?`,
  );
}

export async function acquireImageLock(fh: FileHandle, filename: string, readOnly: boolean): Promise<ImageLock> {
  const st = await fh.stat();
  const key = `${st.dev}:${st.ino}`;
  let holders = inProcess.get(key);
  if (!holders) inProcess.set(key, (holders = new Set()));
  const set = holders;
  const check = (ro: boolean, self?: Holder): void => {
    for (const h of set) {
      if (h === self) continue;
      if (!ro || !h.readOnly) conflict(filename, !ro);
    }
  };
  check(readOnly);
  const native = loadNative();
  if (native) native.lockImage(fh.fd, readOnly, filename);
  const me: Holder = { readOnly };
  set.add(me);
  return {
    async reopen(nfh, ro) {
      check(ro, me);
      if (native) native.lockImage(nfh.fd, ro, filename);
      me.readOnly = ro;
    },
    async release() {
      set.delete(me);
      if (set.size === 0) inProcess.delete(key);
    },
  };
}
