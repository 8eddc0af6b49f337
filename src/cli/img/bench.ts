// `lockstep img bench`: qemu-img bench's request generator. `count` requests of `bufsize`
// bytes, `depth` in flight, at offset, offset + step, ... (wrapping at the image size),
// optionally a flush every `flushInterval` requests (after draining, unless noDrain).
// Prints qemu-img bench's three lines.

import type { Backend } from '../../block/backend.js';
import { strerror } from '../../errors.js';
import { ImgError, type Io } from './common.js';

export interface BenchSpec {
  write: boolean;
  count: number;
  depth: number;
  bufsize: number;
  /** 0: bufsize */
  step: number;
  offset: number;
  pattern: number;
  flushInterval: number;
  drain: boolean;
}

export async function runBench(io: Io, backend: Backend, spec: BenchSpec): Promise<number> {
  const step = spec.step || spec.bufsize;
  const size = backend.getLength();
  io.out(
    `Sending ${spec.count} ${spec.write ? 'write' : 'read'} requests, ${spec.bufsize} bytes each, ${spec.depth} in parallel ` +
      `(starting at offset ${spec.offset}, step size ${step})\n`,
  );
  if (spec.flushInterval) io.out(`Sending flush every ${spec.flushInterval} requests\n`);
  // one buffer for every write: a write never keeps the caller's buffer
  const buf = spec.write ? Buffer.alloc(spec.bufsize, spec.pattern) : null;
  let next = spec.offset;
  let submitted = 0;
  const takeOffset = (): number => {
    const o = next;
    next += step;
    next = size === 0 ? 0 : next % size;
    return o;
  };
  // one read buffer per request slot, reused, as qemu-img bench does
  const slots = buf ? [] : Array.from({ length: spec.depth }, () => Buffer.allocUnsafeSlow(spec.bufsize));
  /** runs `n` requests with up to `depth` in flight */
  const batch = async (n: number): Promise<void> => {
    const end = submitted + n;
    const worker = async (slot: number): Promise<void> => {
      const rbuf = slots[slot];
      while (submitted < end) {
        submitted++;
        const offset = takeOffset();
        if (buf) await backend.write(offset, buf);
        else await backend.readInto(offset, rbuf!);
      }
    };
    await Promise.all(Array.from({ length: Math.min(spec.depth, n) }, (_, slot) => worker(slot)));
  };
  const start = process.hrtime.bigint();
  try {
    if (!spec.flushInterval) {
      await batch(spec.count);
    } else {
      const pendingFlushes: Promise<void>[] = [];
      while (submitted < spec.count) {
        await batch(Math.min(spec.flushInterval, spec.count - submitted));
        if (spec.drain) await backend.flush();
        else pendingFlushes.push(backend.flush());
      }
      await Promise.all(pendingFlushes);
    }
  } catch (e) {
    throw new ImgError(`Failed request: ${strerror(e)}`);
  }
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  io.out(`Run completed in ${seconds.toFixed(3)} seconds.\n`);
  return 0;
}
