// `lockstep img compare A B`: guest-visible content, qemu-img's messages and exit codes
// (0 identical, 1 different, 2 error). A mismatch is reported at the 512-byte sector that
// holds its first differing byte, as qemu-img does.

import type { Backend } from '../../block/backend.js';
import { isAllocatedAbove } from '../../block/chain.js';
import { Progress, type Io } from './common.js';

const CHUNK = 4 * 1024 * 1024;
const SECTOR = 512;

function firstDifference(a: Buffer, b: Buffer): number {
  // compare word-sized strides first: most chunks are equal
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i += 4096) {
    const end = Math.min(n, i + 4096);
    if (a.subarray(i, end).equals(b.subarray(i, end))) continue;
    for (let j = i; j < end; j++) if (a[j] !== b[j]) return j;
  }
  return -1;
}

function firstNonZero(buf: Buffer): number {
  for (let i = 0; i < buf.length; i++) if (buf[i] !== 0) return i;
  return -1;
}

export interface CompareOptions {
  strict: boolean;
  quiet: boolean;
  progress: boolean;
}

export async function runCompare(io: Io, a: Backend, b: Backend, opts: CompareOptions): Promise<number> {
  const say = (s: string): void => {
    if (!opts.quiet) io.out(s);
  };
  const lenA = a.getLength();
  const lenB = b.getLength();
  if (opts.strict && lenA !== lenB) {
    say('Strict mode: Image size mismatch!\n');
    return 1;
  }
  const common = Math.min(lenA, lenB);
  const total = Math.max(lenA, lenB);
  const progress = new Progress(io, opts.progress && !opts.quiet);
  progress.update(0);
  for (let pos = 0; pos < common; ) {
    const n = Math.min(CHUNK, common - pos);
    if (opts.strict) {
      const sa = await isAllocatedAbove(a.node, null, pos, n);
      const sb = await isAllocatedAbove(b.node, null, pos, n);
      if (sa.allocated !== sb.allocated) {
        progress.finish();
        say(`Strict mode: Offset ${pos} block status mismatch!\n`);
        return 1;
      }
    }
    const [da, db] = await Promise.all([a.read(pos, n), b.read(pos, n)]);
    const diff = firstDifference(da, db);
    if (diff >= 0) {
      progress.finish();
      const at = pos + diff;
      say(`Content mismatch at offset ${at - (at % SECTOR)}!\n`);
      return 1;
    }
    pos += n;
    progress.update(pos / total);
  }
  if (lenA !== lenB) {
    say('Warning: Image size mismatch!\n');
    const longer = lenA > lenB ? a : b;
    for (let pos = common; pos < total; ) {
      const n = Math.min(CHUNK, total - pos);
      const d = await longer.read(pos, n);
      const nz = firstNonZero(d);
      if (nz >= 0) {
        progress.finish();
        const at = pos + nz;
        say(`Content mismatch at offset ${at - (at % SECTOR)}!\n`);
        return 1;
      }
      pos += n;
      progress.update(pos / total);
    }
  }
  progress.finish();
  say('Images are identical.\n');
  return 0;
}
