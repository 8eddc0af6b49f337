// `lockstep img convert` and `lockstep img commit`: copying guest data between images.
// convert creates the target (raw or qcow2) and copies everything that does not read as
// zeroes (the new target already reads as zeroes there); commit writes what the top image
// defines into its backing file and then empties the top (unless -d).

import type { Backend } from '../../block/backend.js';
import type { BlockNode } from '../../block/node.js';
import { errorMessage } from '../../errors.js';
import { ImgError, Progress, openImage, withGraph, type Io, type OpenSpec } from './common.js';
import { runCreate } from './create.js';

const CHUNK = 2 * 1024 * 1024;
/** qemu-img convert's default sparse granularity (-S 4k) */
const SPARSE = 4096;

function isZero(buf: Buffer): boolean {
  for (let i = 0; i < buf.length; i += SPARSE) {
    const end = Math.min(buf.length, i + SPARSE);
    for (let j = i; j < end; j++) if (buf[j] !== 0) return false;
  }
  return true;
}

/** Whether the chain under `node` reads as zeroes over [offset, +length) without reading it. */
async function knownZero(node: BlockNode, offset: number, length: number): Promise<number> {
  const s = await node.blockStatus(offset, length);
  if (s.allocated) return s.zero ? s.length : 0;
  const b = node.backing;
  if (!b || offset >= b.getLength()) return s.length;
  return knownZero(b, offset, Math.min(s.length, b.getLength() - offset));
}

/** Chunks in flight at once, like qemu-img convert's default of 8 coroutines (-m). */
const WORKERS = 8;

/**
 * Copies one chunk: skips what reads as zeroes, writes the non-zero 4 KiB-granular runs.
 * Reads into the worker's own buffer (`scratch`: a CHUNK-sized buffer allocated on the
 * worker's first read, as each qemu-img convert coroutine keeps one): a fresh buffer per
 * chunk left hundreds of MiB of garbage on a deep chain and doubled the peak RSS.
 */
async function copyChunk(src: Backend, dst: Backend, pos: number, n: number, scratch: { buf: Buffer | null }): Promise<void> {
  const end = pos + n;
  while (pos < end) {
    const zeroRun = await knownZero(src.node, pos, end - pos);
    if (zeroRun > 0) {
      pos += zeroRun;
      continue;
    }
    // read up to the end of the chunk (block status may have ended a data run early)
    const len = end - pos;
    scratch.buf ??= Buffer.allocUnsafeSlow(CHUNK);
    const buf = scratch.buf.subarray(0, len);
    // every byte is overwritten; each write below completes before the buffer is reused
    await src.readInto(pos, buf);
    let runStart = -1;
    for (let i = 0; i <= len; i += SPARSE) {
      const zero = i >= len || isZero(buf.subarray(i, Math.min(len, i + SPARSE)));
      if (!zero && runStart < 0) runStart = i;
      if (zero && runStart >= 0) {
        await dst.write(pos + runStart, buf.subarray(runStart, Math.min(len, i)));
        runStart = -1;
      }
    }
    pos = end;
  }
}

/**
 * Copies [0, length) of `src` to `dst` (a fresh target that reads as zeroes), CHUNK bytes
 * at a time with up to WORKERS chunks in flight; chunks may complete out of order.
 */
async function copyData(src: Backend, dst: Backend, length: number, progress: Progress): Promise<void> {
  let next = 0;
  let copied = 0;
  const worker = async (): Promise<void> => {
    const scratch: { buf: Buffer | null } = { buf: null };
    while (next < length) {
      const pos = next;
      const n = Math.min(CHUNK, length - pos);
      next += n;
      await copyChunk(src, dst, pos, n, scratch);
      copied += n;
      progress.update(copied / length);
    }
  };
  await Promise.all(Array.from({ length: WORKERS }, worker));
}

export interface ConvertSpec {
  source: OpenSpec;
  target: string;
  targetFormat: string;
  createOptions: Array<[string, string]>;
  progress: boolean;
  quiet: boolean;
  /** -n: the target exists; do not create it */
  noCreate: boolean;
  targetCache?: string;
}

export async function runConvert(io: Io, spec: ConvertSpec): Promise<number> {
  return withGraph(async (graph) => {
    const src = await openImage(graph, { ...spec.source, readOnly: true });
    const size = src.node.getLength();
    if (!spec.noCreate) {
      // creation prints nothing in convert
      await runCreate({ filename: spec.target, format: spec.targetFormat, size, options: spec.createOptions }, () => {}, true);
    }
    const dstSpec: OpenSpec = { filename: spec.target, format: spec.targetFormat, noBacking: true };
    if (spec.targetCache !== undefined) dstSpec.cache = spec.targetCache;
    const dst = await openImage(graph, dstSpec);
    if (dst.node.getLength() < size) throw new ImgError(`Target image is smaller than the source (${dst.node.getLength()} < ${size} bytes)`);
    const progress = new Progress(io, spec.progress && !spec.quiet);
    progress.update(0);
    try {
      await copyData(src.backend, dst.backend, size, progress);
      await dst.backend.flush();
    } catch (e) {
      throw new ImgError(`error while converting ${spec.targetFormat}: ${errorMessage(e)}`);
    }
    progress.finish();
    return 0;
  });
}

export interface CommitSpec {
  image: OpenSpec;
  /** -d: keep the top image's data (do not empty it) */
  keep: boolean;
  progress: boolean;
  quiet: boolean;
  /** -b: only the immediate backing file is supported */
  base?: string;
}

export async function runCommit(io: Io, spec: CommitSpec): Promise<number> {
  return withGraph(async (graph) => {
    const top = await openImage(graph, { ...spec.image, readOnly: false });
    const base = top.node.backing;
    if (!base) throw new ImgError(`Image does not have a backing file`);
    if (spec.base !== undefined && spec.base !== base.filename && !base.filename.endsWith(`/${spec.base}`)) {
      throw new ImgError(`'${spec.base}' is not the immediate backing file of '${spec.image.filename}': lockstep commits into the immediate backing file only`);
    }
    await base.setReadOnly(false);
    const length = top.node.getLength();
    if (base.getLength() < length) await base.truncate(length);
    const progress = new Progress(io, spec.progress && !spec.quiet);
    progress.update(0);
    for (let pos = 0; pos < length; ) {
      const s = await top.node.blockStatus(pos, Math.min(CHUNK, length - pos));
      if (s.allocated) {
        const data = await top.node.read(pos, s.length);
        await base.write(pos, data);
      }
      pos += s.length;
      progress.update(pos / length);
    }
    await base.flush();
    if (!spec.keep) {
      try {
        await top.node.makeEmpty();
      } catch (e) {
        throw new ImgError(`Could not empty ${spec.image.filename}: ${errorMessage(e)}`);
      }
      await top.node.flush();
    }
    progress.finish();
    if (!spec.quiet) io.out('Image committed.\n');
    return 0;
  });
}
