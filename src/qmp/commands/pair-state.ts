// The pair's state on disk, for the supervisor (lockstep's own commands, no QEMU
// equivalent): x-meta-read / x-meta-write store a JSON object crash-safely (the supervisor
// owns its schema: generations, roles, consistency), and x-dirty-log-* drive the dirty-log
// filter (src/block/filters/dirty-log.ts) and read the log of a disk whose daemon died.

import { readFile } from 'node:fs/promises';
import { command, type QmpCommand, type QmpContext } from '../dispatch.js';
import { InvalidArgumentError, errorMessage } from '../../errors.js';
import { getDirtyLog, readDirtyLogFile, type DirtyLog } from '../../block/filters/dirty-log.js';
import { replaceFileDurably } from '../../util/durable.js';
import { ANY_DICT, listOf, struct } from '../schema/types.js';
import type { ByteRange } from '../../util/bitmap.js';

/** x-meta-write's limit on the stored JSON text. */
export const META_MAX_BYTES = 1024 * 1024;

export const EXTENTS = listOf(struct({ offset: 'int', length: 'int' }));

function dirtyLog(ctx: QmpContext, name: string): DirtyLog {
  return getDirtyLog(ctx.graph.getNode(name));
}

/** Checks extents against a disk of `size` bytes; messages name the extent by index. */
export function checkExtents(extents: readonly ByteRange[], size: number, what = 'extents'): void {
  extents.forEach((e, i) => {
    const name = `${what}[${i}] (offset ${e.offset}, length ${e.length})`;
    if (e.offset < 0 || e.length <= 0) throw new InvalidArgumentError(`${name}: offset must be non-negative and length positive`);
    if (e.offset + e.length > size) throw new InvalidArgumentError(`${name} ends past the end of the disk (${size} bytes)`);
  });
}

export const pairStateCommands: readonly QmpCommand[] = [
  command('x-meta-read', { filename: 'str' }, async (_ctx, args) => {
    const path = args.filename;
    let text: string;
    try {
      text = await readFile(path, 'utf8');
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
      throw new InvalidArgumentError(`Cannot read metadata '${path}': ${errorMessage(e)}`);
    }
    let data: unknown;
    try {
      data = JSON.parse(text);
    } catch (e) {
      throw new InvalidArgumentError(`Metadata '${path}' is not valid JSON: ${errorMessage(e)}`);
    }
    if (typeof data !== 'object' || data === null || Array.isArray(data)) throw new InvalidArgumentError(`Metadata '${path}' does not hold a JSON object`);
    return data;
  }),

  command('x-meta-write', { filename: 'str', data: ANY_DICT }, async (_ctx, args) => {
    const path = args.filename;
    const text = Buffer.from(JSON.stringify(args.data) + '\n', 'utf8');
    if (text.length > META_MAX_BYTES) throw new InvalidArgumentError(`Metadata for '${path}' is ${text.length} bytes, more than the limit of ${META_MAX_BYTES}`);
    try {
      await replaceFileDurably(path, text);
    } catch (e) {
      throw new InvalidArgumentError(`Cannot write metadata '${path}': ${errorMessage(e)}`);
    }
    return {};
  }),

  command('x-dirty-log-checkpoint', { 'node-name': 'str' }, (ctx, args) => {
    dirtyLog(ctx, args['node-name']).checkpoint();
    return {};
  }),

  command('x-dirty-log-query', { 'node-name': 'str' }, (ctx, args) => dirtyLog(ctx, args['node-name']).report()),

  command('x-dirty-log-mark', { 'node-name': 'str', extents: EXTENTS }, async (ctx, args) => {
    const log = dirtyLog(ctx, args['node-name']);
    const extents: ByteRange[] = args.extents;
    checkExtents(extents, log.size);
    await log.markExtents(extents);
    return {};
  }),

  command('x-dirty-log-clear', { 'node-name': 'str' }, async (ctx, args) => {
    await dirtyLog(ctx, args['node-name']).clear();
    return {};
  }),

  // lockstep: the granules whose writes completed since the previous call (the first call
  // starts tracking and reports nothing); a live resync copies them in its next pass
  command('x-dirty-log-written', { 'node-name': 'str', '*stop': 'bool' }, (ctx, args) =>
    dirtyLog(ctx, args['node-name']).takeWritten(args.stop ?? false),
  ),

  command('x-dirty-log-read', { filename: 'str' }, (_ctx, args) => readDirtyLogFile(args.filename)),
];
