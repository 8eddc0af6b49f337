// Crash-safe file replacement: write a temporary file in the same directory, fdatasync it,
// rename it over the destination, fsync the directory. After a SIGKILL or power loss at any
// moment the destination holds either its old content or the new one, never a mix (rename
// is atomic within a filesystem; the data is stable before the rename can be seen, and the
// rename is stable once the directory is synced). Used by x-meta-write and the dirty log.

import { open, rename, unlink, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { randomBytes } from 'node:crypto';

/** fsync of a directory, so that a rename or a new name in it survives a power loss. */
export async function syncDirectory(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * Replaces `path` with `data` crash-safely. With `keepOpen` the new file stays open
 * read-write and its handle is returned (the dirty log keeps writing into it in place).
 */
export async function replaceFileDurably(path: string, data: Uint8Array, keepOpen: true): Promise<FileHandle>;
export async function replaceFileDurably(path: string, data: Uint8Array, keepOpen?: false): Promise<void>;
export async function replaceFileDurably(path: string, data: Uint8Array, keepOpen = false): Promise<FileHandle | void> {
  const dir = dirname(path);
  // a name no other writer picks; a leftover from a crash is ignored by readers of `path`
  const tmp = join(dir, `.${basename(path)}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`);
  const fh = await open(tmp, 'wx+', 0o600);
  let renamed = false;
  try {
    for (let pos = 0; pos < data.length; ) {
      const { bytesWritten } = await fh.write(data, pos, data.length - pos, pos);
      pos += bytesWritten;
    }
    await fh.datasync();
    await rename(tmp, path);
    renamed = true;
    await syncDirectory(dir);
  } catch (e) {
    await fh.close().catch(() => {});
    if (!renamed) await unlink(tmp).catch(() => {});
    throw e;
  }
  if (keepOpen) return fh;
  await fh.close();
}
