// `lockstep img check`: qcow2 consistency through the driver's checkQcow2, with qemu-img's
// human lines, JSON and exit codes (0 clean, 1 check failed, 2 corruptions, 3 leaks only,
// 63 format without checks).

import { errorMessage } from '../../errors.js';
import { probeFormat } from '../../block/probe.js';
import { open as fsOpen } from 'node:fs/promises';
import { ImgError, PROG, loadQcow2, newGraph, openImage, type Io } from './common.js';

/** Whether a qcow2 header names a backing file (backing_file_offset != 0). */
async function hasBackingFile(filename: string): Promise<boolean> {
  const fh = await fsOpen(filename, 'r');
  try {
    const b = Buffer.alloc(16);
    const { bytesRead } = await fh.read(b, 0, 16, 0);
    return bytesRead === 16 && b.readBigUInt64BE(8) !== 0n;
  } finally {
    await fh.close();
  }
}

export const EXIT_NO_CHECKS = 63;

function num(r: Record<string, unknown>, key: string): number {
  const v = r[key];
  return typeof v === 'number' ? v : 0;
}

/** JSON keys in qemu-img 7.2's order (observed on its output). */
const JSON_ORDER = [
  'image-end-offset',
  'total-clusters',
  'corruptions',
  'corruptions-fixed',
  'check-errors',
  'leaks',
  'leaks-fixed',
  'allocated-clusters',
  'fragmented-clusters',
  'compressed-clusters',
  'filename',
  'format',
];

export function checkHuman(r: Record<string, unknown>): string {
  let s = '';
  const corruptions = num(r, 'corruptions');
  const leaks = num(r, 'leaks');
  const errors = num(r, 'check-errors');
  const leaksFixed = num(r, 'leaks-fixed');
  const corruptionsFixed = num(r, 'corruptions-fixed');
  if (leaksFixed || corruptionsFixed) {
    s += `The following inconsistencies were found and repaired:\n\n    ${leaksFixed} leaked clusters\n    ${corruptionsFixed} corruptions\n\nDouble checking the fixed image now...\n`;
  }
  if (corruptions === 0 && leaks === 0 && errors === 0) {
    s += 'No errors were found on the image.\n';
  } else {
    if (corruptions) s += `\n${corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n`;
    if (leaks) s += `\n${leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n`;
    if (errors) s += `\n${errors} internal errors have occurred during the check.\n`;
  }
  const total = num(r, 'total-clusters');
  const allocated = num(r, 'allocated-clusters');
  if (total !== 0 && allocated !== 0) {
    const pct = (n: number): string => ((n * 100) / total).toFixed(2);
    const fragmented = (num(r, 'fragmented-clusters') * 100) / allocated;
    const compressed = (num(r, 'compressed-clusters') * 100) / allocated;
    s += `${allocated}/${total} = ${pct(allocated)}% allocated, ${fragmented.toFixed(2)}% fragmented, ${compressed.toFixed(2)}% compressed clusters\n`;
  }
  if (num(r, 'image-end-offset')) s += `Image end offset: ${num(r, 'image-end-offset')}\n`;
  return s;
}

export function checkExitCode(r: Record<string, unknown>): number {
  if (num(r, 'check-errors')) return 1;
  if (num(r, 'corruptions')) return 2;
  if (num(r, 'leaks')) return 3;
  return 0;
}

export async function runCheck(
  io: Io,
  filename: string,
  format: string | undefined,
  repair: 'leaks' | 'all' | undefined,
  json: boolean,
  quiet: boolean,
): Promise<number> {
  const fmt = format ?? (await probeFormat(filename).catch((e: unknown) => {
    throw new ImgError(`Could not open '${filename}': ${errorMessage(e)}`);
  }));
  if (fmt !== 'qcow2') {
    io.err(`lockstep img: This image format does not support checks\n`);
    return EXIT_NO_CHECKS;
  }
  const lib = await loadQcow2();
  if (await hasBackingFile(filename)) {
    // qemu-img check opens the image with its backing chain: a backing file that is missing
    // or refused fails the check (exit 1) rather than passing unseen
    const graph = newGraph();
    try {
      await openImage(graph, { filename, format: 'qcow2', readOnly: true });
    } finally {
      await graph.closeAll();
    }
  }
  let result: Record<string, unknown>;
  try {
    result = await lib.checkQcow2(filename, repair === undefined ? {} : { repair });
  } catch (e) {
    const checkText = (e as { checkText?: unknown }).checkText;
    if (typeof checkText === 'string') {
      // what qemu-img check says of a table it will not read (snapshot table limits)
      io.err(`${PROG}: ${checkText}${PROG}: Check failed: File too large\n`);
      return 1;
    }
    throw new ImgError(`Could not open '${filename}': ${errorMessage(e)}`);
  }
  const full: Record<string, unknown> = { ...result, filename, format: 'qcow2' };
  if (json) {
    const ordered: Record<string, unknown> = {};
    // like qemu-img, optional counters appear only when non-zero
    const always = new Set(['check-errors', 'filename', 'format']);
    for (const k of JSON_ORDER) if (full[k] !== undefined && (always.has(k) || full[k] !== 0)) ordered[k] = full[k];
    for (const [k, v] of Object.entries(full)) if (!JSON_ORDER.includes(k) && v !== undefined) ordered[k] = v;
    io.out(JSON.stringify(ordered, null, 4) + '\n');
  } else if (!quiet) {
    io.out(checkHuman(full));
  }
  return checkExitCode(full);
}
