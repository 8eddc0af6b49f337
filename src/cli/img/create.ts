// `lockstep img create`: raw files directly, qcow2 through the qcow2 driver's createQcow2.
// Prints qemu-img's "Formatting '...', fmt=... size=..." line.

import { open as fsOpen } from 'node:fs/promises';
import { dirname, isAbsolute, join } from 'node:path';
import { errorMessage, strerror } from '../../errors.js';
import { probeFormat } from '../../block/probe.js';
import { ImgError, loadQcow2, openImage, parseImageSize, withGraph } from './common.js';

export interface CreateSpec {
  filename: string;
  format: string;
  size?: number;
  backingFile?: string;
  backingFormat?: string;
  /** -o key=value pairs in order */
  options: Array<[string, string]>;
}

/** Parses -o "a=b,c=d" (commas doubled to escape) into pairs. */
export function parseCreateOptions(text: string): Array<[string, string]> {
  const out: Array<[string, string]> = [];
  const parts: string[] = [];
  let cur = '';
  for (let i = 0; i < text.length; i++) {
    const c = text[i]!;
    if (c === ',' && text[i + 1] === ',') {
      cur += ',';
      i++;
    } else if (c === ',') {
      parts.push(cur);
      cur = '';
    } else cur += c;
  }
  parts.push(cur);
  for (const p of parts) {
    if (p === '') continue;
    const eq = p.indexOf('=');
    if (eq < 0) throw new ImgError(`Invalid parameter '${p}'`);
    out.push([p.slice(0, eq), p.slice(eq + 1)]);
  }
  return out;
}

function onOff(key: string, v: string): boolean {
  if (v === 'on' || v === 'true' || v === 'yes') return true;
  if (v === 'off' || v === 'false' || v === 'no') return false;
  throw new ImgError(`Parameter '${key}' expects 'on' or 'off'`);
}

async function createRaw(filename: string, size: number): Promise<void> {
  let fh;
  try {
    fh = await fsOpen(filename, 'w');
  } catch (e) {
    throw new ImgError(`${filename}: Could not create '${filename}': ${strerror(e)}`);
  }
  try {
    // like file-posix, the size is rounded up to whole 512-byte sectors
    const length = Math.ceil(size / 512) * 512;
    await fh.truncate(length);
    // QEMU allocates the first block of a new raw file (its alignment probe reads it);
    // doing the same gives the same disk size and map
    if (length > 0) await fh.write(Buffer.alloc(Math.min(4096, length)), 0, Math.min(4096, length), 0);
  } finally {
    await fh.close();
  }
}

export async function runCreate(spec: CreateSpec, out: (s: string) => void, quiet: boolean): Promise<number> {
  const opts = new Map(spec.options);
  let size = spec.size;
  if (opts.has('size')) {
    const s = parseImageSize(opts.get('size')!);
    if (s === null) throw new ImgError('Parameter \'size\' expects a non-negative number below 2^64');
    size = s;
  }
  const backingFile = spec.backingFile ?? opts.get('backing_file');
  const backingFormat = spec.backingFormat ?? opts.get('backing_fmt');
  if (spec.format === 'raw') {
    for (const [k] of spec.options) if (k !== 'size' && k !== 'preallocation') throw new ImgError(`${spec.filename}: Invalid parameter '${k}'`);
    if (opts.has('preallocation') && opts.get('preallocation') !== 'off') throw new ImgError(`preallocation=${opts.get('preallocation')!} is not supported by lockstep for raw`);
    if (backingFile !== undefined) throw new ImgError(`${spec.filename}: Backing file not supported for file format 'raw'`);
    if (size === undefined) throw new ImgError(`${spec.filename}: Image creation needs a size parameter`);
    if (!quiet) out(`Formatting '${spec.filename}', fmt=raw size=${size}\n`);
    await createRaw(spec.filename, size);
    return 0;
  }
  if (spec.format !== 'qcow2') throw new ImgError(`Unknown file format '${spec.format}'`);

  const known = new Set(['size', 'cluster_size', 'lazy_refcounts', 'refcount_bits', 'compat', 'preallocation', 'backing_file', 'backing_fmt']);
  for (const [k] of spec.options) if (!known.has(k)) throw new ImgError(`${spec.filename}: Invalid parameter '${k}'`);
  const clusterSize = opts.has('cluster_size') ? parseImageSize(opts.get('cluster_size')!) : 65536;
  if (clusterSize === null) throw new ImgError(`Parameter 'cluster_size' expects a non-negative number below 2^64`);
  const lazyRefcounts = opts.has('lazy_refcounts') ? onOff('lazy_refcounts', opts.get('lazy_refcounts')!) : false;
  const refcountBits = opts.has('refcount_bits') ? Number(opts.get('refcount_bits')) : 16;
  if (!Number.isInteger(refcountBits)) throw new ImgError(`Parameter 'refcount_bits' expects a number`);
  const compat = opts.get('compat') ?? '1.1';
  const compatValue = compat === 'v2' ? '0.10' : compat === 'v3' ? '1.1' : compat;
  if (compatValue !== '0.10' && compatValue !== '1.1') throw new ImgError(`Invalid compatibility level: '${compat}'`);
  const preallocation = opts.get('preallocation') ?? 'off';
  if (preallocation !== 'off' && preallocation !== 'metadata') throw new ImgError(`Unsupported preallocation mode '${preallocation}'`);
  if (backingFile !== undefined && backingFormat === undefined) {
    // qemu-img 7.2 requires -F with -b; probing the backing file is what QEMU used to do
    let detected = '';
    try {
      detected = `\nDetected format of ${await probeFormat(resolveBacking(spec.filename, backingFile))}.`;
    } catch {
      // the backing file cannot be read: nothing to suggest
    }
    throw new ImgError(`${spec.filename}: Backing file specified without backing format${detected}`);
  }
  if (size === undefined) {
    if (backingFile === undefined) throw new ImgError(`${spec.filename}: Image creation needs a size parameter`);
    size = await backingSize(spec.filename, backingFile, backingFormat);
  }
  if (backingFile !== undefined && preallocation !== 'off') {
    throw new ImgError(`${spec.filename}: Backing file and preallocation can only be used at the same time if extended_l2 is on`);
  }
  const lib = await loadQcow2();
  if (!quiet) {
    let line = `Formatting '${spec.filename}', fmt=qcow2 cluster_size=${clusterSize} extended_l2=off`;
    if (opts.has('preallocation')) line += ` preallocation=${preallocation}`;
    line += ` compression_type=zlib size=${size}`;
    if (opts.has('compat')) line += ` compat=${compat}`;
    if (backingFile !== undefined) line += ` backing_file=${backingFile} backing_fmt=${backingFormat!}`;
    line += ` lazy_refcounts=${lazyRefcounts ? 'on' : 'off'} refcount_bits=${refcountBits}`;
    out(line + '\n');
  }
  const createOpts: Parameters<typeof lib.createQcow2>[1] = { size, clusterSize, lazyRefcounts, refcountBits, compat: compatValue, preallocation };
  if (backingFile !== undefined) createOpts.backingFile = backingFile;
  if (backingFormat !== undefined) createOpts.backingFormat = backingFormat;
  try {
    await lib.createQcow2(spec.filename, createOpts);
  } catch (e) {
    throw new ImgError(`${spec.filename}: ${errorMessage(e)}`);
  }
  return 0;
}

/** A backing file name as QEMU resolves it: relative to the overlay's folder. */
export function resolveBacking(overlay: string, backing: string): string {
  return isAbsolute(backing) ? backing : join(dirname(overlay), backing);
}

async function backingSize(overlay: string, backing: string, format: string | undefined): Promise<number> {
  return withGraph(async (graph) => {
    const spec = { filename: resolveBacking(overlay, backing), readOnly: true };
    const img = await openImage(graph, format === undefined ? spec : { ...spec, format });
    return img.node.getLength();
  });
}
