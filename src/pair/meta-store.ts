// Where a disk's generation record lives: beside the disk, on the disk's own host, as
// DISK.meta.json. A daemon on this host: written here directly; a daemon on another host:
// through its x-meta-read / x-meta-write commands. Either way crash-safe: a temp file in the
// same directory, fsync, rename over the record, fsync the directory, so that a SIGKILL or a
// power loss at any moment leaves the old record or the new one.

import { closeSync, fsyncSync, openSync, readFileSync, renameSync, writeSync } from 'node:fs';
import { dirname } from 'node:path';
import { errorMessage } from '../errors.js';
import { parseMeta, type DiskMeta } from './generations.js';
import { imagePath } from './setup.js';
import type { Side } from './sides.js';

export function metaPath(side: Side, disk: string): string {
  return imagePath(side.layout, `${disk}.meta.json`);
}

export function writeFileDurably(path: string, text: string): void {
  const tmp = `${path}.tmp`;
  const fd = openSync(tmp, 'w', 0o644);
  try {
    writeSync(fd, text);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  renameSync(tmp, path);
  const dfd = openSync(dirname(path), 'r');
  try {
    fsyncSync(dfd);
  } finally {
    closeSync(dfd);
  }
}

export async function readMeta(side: Side, disk: string, call: (side: Side, cmd: string, args: Record<string, unknown>) => Promise<unknown>): Promise<DiskMeta | null> {
  const path = metaPath(side, disk);
  let value: unknown;
  if (side.layout.local) {
    let text: string;
    try {
      text = readFileSync(path, 'utf8');
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
      throw new Error(`cannot read ${path}: ${errorMessage(e)}`);
    }
    try {
      value = JSON.parse(text);
    } catch {
      throw new Error(`${path}: not a lockstep pair metadata record (malformed JSON)`);
    }
  } else {
    value = await call(side, 'x-meta-read', { filename: path });
  }
  return parseMeta(value, path);
}

export async function writeMeta(side: Side, meta: DiskMeta, call: (side: Side, cmd: string, args: Record<string, unknown>) => Promise<unknown>): Promise<void> {
  const path = metaPath(side, meta.disk);
  if (side.layout.local) writeFileDurably(path, JSON.stringify(meta, null, 1) + '\n');
  else await call(side, 'x-meta-write', { filename: path, data: meta });
}
