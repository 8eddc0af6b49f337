// Shared pieces of `lockstep img` subcommands: opening an image the way qemu-img does
// (-f FMT, probing, json: filenames, --image-opts), qemu-img's error line, image sizes,
// the qcow2 library (loaded lazily: it lives in the qcow2 driver's folder), progress.

import { toolPerms } from '../../block/permissions.js';
import type { CreateQcow2Options } from '../../block/drivers/qcow2/create.js';
import { stat } from 'node:fs/promises';
import { BlockGraph } from '../../block/graph.js';
import type { BlockNode } from '../../block/node.js';
import type { Backend } from '../../block/backend.js';
import { isDict, type OptionDict } from '../../block/options.js';
import { InvalidArgumentError, errorMessage } from '../../errors.js';
import { parseOptionString } from '../../util/keyval.js';
import { completeImageOptions, imageOptions } from '../image-spec.js';
import { createRegistry } from '../../block/registry.js';

export const PROG = 'lockstep img';

/** A failure that ends the subcommand: printed as "lockstep img: <message>", exit `code`. */
export class ImgError extends Error {
  override name = 'ImgError';
  constructor(
    message: string,
    readonly code = 1,
  ) {
    super(message);
  }
}

export interface Io {
  out(s: string): void;
  err(s: string): void;
}

export interface OpenSpec {
  filename: string;
  format?: string;
  imageOpts?: boolean;
  readOnly?: boolean;
  /** open without the backing chain (qemu-img's BDRV_O_NO_BACKING) */
  noBacking?: boolean;
  /** metadata only (qemu-img info's BDRV_O_NO_IO): no consistent-read permission taken */
  noIo?: boolean;
  /** cache mode (-t): writeback (default), writethrough, unsafe, none/directsync (refused by file) */
  cache?: string;
}

export interface OpenedImage {
  node: BlockNode;
  backend: Backend;
  /** the host filename, for messages and info */
  filename: string;
}

export function newGraph(): BlockGraph {
  return new BlockGraph(createRegistry());
}

/**
 * Runs `fn` on a new graph and closes the graph afterwards. A close that fails (a qcow2
 * writeback of its cached tables that could not reach the file) fails the command, as a
 * lost write must; when `fn` itself failed, its error is the one reported.
 */
export async function withGraph<T>(fn: (graph: BlockGraph) => Promise<T>): Promise<T> {
  const graph = newGraph();
  let result: T;
  try {
    result = await fn(graph);
  } catch (e) {
    await graph.closeAll().catch(() => {});
    throw e;
  }
  try {
    await graph.closeAll();
  } catch (e) {
    throw new ImgError(`Error while closing the image: ${errorMessage(e)}`);
  }
  return result;
}

/** Opens an image; errors come back as qemu-img words them ("Could not open 'x': ..."). */
export async function openImage(graph: BlockGraph, spec: OpenSpec): Promise<OpenedImage> {
  if (spec.format !== undefined && !graph.drivers.has(spec.format)) {
    throw new ImgError(`Could not open '${spec.filename}': Unknown driver '${spec.format}'`);
  }
  let dict: OptionDict;
  let keyval: boolean;
  try {
    if (spec.imageOpts) {
      const parsed = parseOptionString(spec.filename);
      dict = (await completeImageOptions(parsed.dict)).dict;
      keyval = parsed.keyval;
    } else {
      const s = await imageOptions(spec.filename, spec.format);
      dict = s.dict;
      keyval = s.keyval;
    }
    if (!graph.drivers.has(String(dict.driver))) throw new InvalidArgumentError(`Unknown driver '${String(dict.driver)}'`);
    if (spec.noBacking && dict.backing === undefined && graph.drivers.get(String(dict.driver))?.supportsBacking) dict.backing = null;
    const writethrough = applyCache(dict, keyval, spec.cache);
    const noIo = spec.noIo ?? false;
    const node = await graph.open(dict, { keyval, readOnly: spec.readOnly ?? false, noIo });
    // qemu-img's BlockBackend (blk_new_open): shares everything; the formats decide the rest
    const backend = graph.createBackend(node, { readOnly: spec.readOnly ?? false, writethrough, perms: toolPerms(!(spec.readOnly ?? false), noIo) });
    const file = isDict(dict.file) && typeof dict.file.filename === 'string' ? dict.file.filename : node.filename;
    return { node, backend, filename: spec.imageOpts ? node.filename : spec.filename || file };
  } catch (e) {
    if (e instanceof ImgError) throw e;
    throw new ImgError(`Could not open '${spec.filename}': ${errorMessage(e)}`);
  }
}

/**
 * Sets the node options of a -t cache mode; returns whether the write cache is off
 * (writethrough, directsync: every write is FUA, as qemu-img's BlockBackend does it).
 */
function applyCache(dict: OptionDict, keyval: boolean, cache: string | undefined): boolean {
  if (cache === undefined || cache === 'writeback') return false;
  if (cache === 'writethrough') return true;
  const on = keyval ? 'on' : true;
  let key: string;
  if (cache === 'unsafe') key = 'no-flush';
  else if (cache === 'none' || cache === 'directsync') key = 'direct';
  else throw new ImgError(`Invalid cache option: ${cache}`);
  for (const n of [dict, dict.file]) {
    if (!isDict(n)) continue;
    const c = isDict(n.cache) ? n.cache : (n.cache = {});
    (c as OptionDict)[key] = on;
  }
  return cache === 'directsync';
}

/** Bytes the host file occupies (qemu-img's "disk size" / actual-size). */
export async function allocatedFileSize(filename: string): Promise<number | undefined> {
  try {
    const st = await stat(filename);
    return st.blocks * 512;
  } catch {
    return undefined;
  }
}

/**
 * qemu-img's size argument: a number with an optional k, M, G, T, P, E suffix (bytes by
 * default, 'b' too); rejects negatives and fractions of a byte.
 */
export function parseImageSize(text: string): number | null {
  const m = /^(\d+(?:\.\d+)?)([bkmgtpe]?)$/i.exec(text.trim());
  if (!m) return null;
  const mult = 2 ** (10 * 'bkmgtpe'.indexOf((m[2] || 'b').toLowerCase()));
  const value = Number(m[1]) * mult;
  if (!Number.isSafeInteger(value)) return null;
  return value;
}

/** qemu's progress line: "    (12.34/100%)" rewritten in place with '\r'. */
export class Progress {
  private last = -1;
  constructor(
    private readonly io: Io,
    private readonly enabled: boolean,
  ) {}
  /** fraction 0..1; prints when it moved by at least 1% (and at 0 and 100%) */
  update(fraction: number): void {
    if (!this.enabled) return;
    const pct = Math.min(100, Math.max(0, fraction * 100));
    if (this.last >= 0 && pct - this.last < 1 && pct < 100) return;
    if (pct === this.last) return;
    this.last = pct;
    this.io.out(`    (${pct.toFixed(2)}/100%)\r`);
  }
  finish(): void {
    if (!this.enabled) return;
    this.update(1);
    this.io.out('\n');
  }
}

/** Lazily loaded qcow2 library functions (from the qcow2 driver's folder). */
export interface Qcow2Lib {
  createQcow2(
    filename: string,
    opts: CreateQcow2Options,
  ): Promise<void>;
  checkQcow2(filename: string, opts?: { repair?: 'leaks' | 'all' }): Promise<Record<string, unknown>>;
}

export async function loadQcow2(): Promise<Qcow2Lib> {
  // Module paths in variables: this file compiles whether or not the driver is present.
  const createPath = '../../block/drivers/qcow2/create.js';
  const checkPath = '../../block/drivers/qcow2/check.js';
  try {
    const create = (await import(createPath)) as Pick<Qcow2Lib, 'createQcow2'>;
    const check = (await import(checkPath)) as Pick<Qcow2Lib, 'checkQcow2'>;
    return { createQcow2: create.createQcow2, checkQcow2: check.checkQcow2 };
  } catch (e) {
    if ((e as { code?: string }).code === 'ERR_MODULE_NOT_FOUND') throw new ImgError('qcow2 support is not available in this build');
    throw e;
  }
}
