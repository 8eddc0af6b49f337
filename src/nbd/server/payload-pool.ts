// Reusable buffers for large NBD write payloads (issue 14). A fresh 1 MiB external buffer
// per write at 100+ MB/s doubled what the daemons allocate per byte written (the socket's
// chunks being the other half) and so the GC's work; payloads assembled from many socket
// chunks take a buffer from here instead and give it back once the write has succeeded, which
// (see Transmission.execute) is when nothing below can still read it.
//
// Buffers come in power-of-two classes and the idle ones are bounded in total; anything over
// the bound is left to the GC. A pool made with `poison` fills every released buffer with
// POISON_BYTE, so a holder that still reads one after its release writes visibly wrong bytes.

import { InvalidArgumentError } from '../../errors.js';

/** the byte a poisoning pool fills released buffers with */
export const POISON_BYTE = 0xdb;

export interface PayloadPoolOptions {
  /** idle bytes kept for reuse, over all classes (default 64 MiB; 0: keep none) */
  maxIdleBytes?: number;
  /** smallest class in bytes, a power of two (default 256 KiB) */
  minClass?: number;
  /** fill released buffers with POISON_BYTE (tests, LOCKSTEP_DEBUG_POISON_PAYLOADS=1) */
  poison?: boolean;
}

export interface PayloadPoolStats {
  acquired: number;
  reused: number;
  released: number;
  idleBytes: number;
}

export class PayloadPool {
  private readonly idle = new Map<number, Buffer[]>();
  /** buffers handed out, each view to its whole class-sized slab (a release needs the slab) */
  private readonly out = new WeakMap<Buffer, Buffer>();
  private readonly maxIdleBytes: number;
  private readonly minClass: number;
  readonly poison: boolean;
  private readonly counts: PayloadPoolStats = { acquired: 0, reused: 0, released: 0, idleBytes: 0 };

  constructor(opts: PayloadPoolOptions = {}) {
    this.maxIdleBytes = opts.maxIdleBytes ?? 64 * 1024 * 1024;
    this.minClass = opts.minClass ?? 256 * 1024;
    this.poison = opts.poison ?? false;
    if (!Number.isSafeInteger(this.maxIdleBytes) || this.maxIdleBytes < 0) throw new InvalidArgumentError('payload pool size must be a non-negative integer');
    if (!Number.isSafeInteger(this.minClass) || this.minClass <= 0 || (this.minClass & (this.minClass - 1)) !== 0) {
      throw new InvalidArgumentError('payload pool class must be a power of two');
    }
  }

  private classOf(n: number): number {
    let c = this.minClass;
    while (c < n) c *= 2;
    return c;
  }

  /** A buffer of exactly `n` bytes (contents undefined), to be released at most once. */
  acquire(n: number): Buffer {
    const cls = this.classOf(n);
    this.counts.acquired++;
    let slab = this.idle.get(cls)?.pop();
    if (slab) {
      this.counts.reused++;
      this.counts.idleBytes -= cls;
    } else {
      // Slow: a slab of its own, never a slice of Node's shared pool.
      slab = Buffer.allocUnsafeSlow(cls);
    }
    const view = slab.subarray(0, n);
    this.out.set(view, slab);
    return view;
  }

  /**
   * Gives back a buffer from acquire(); the caller guarantees nothing still reads or writes
   * it. A buffer not handed out by this pool (or already released) is ignored.
   */
  release(buf: Buffer): void {
    const slab = this.out.get(buf);
    if (!slab) return;
    this.out.delete(buf);
    this.counts.released++;
    if (this.poison) slab.fill(POISON_BYTE);
    if (this.counts.idleBytes + slab.length > this.maxIdleBytes) return;
    let list = this.idle.get(slab.length);
    if (!list) this.idle.set(slab.length, (list = []));
    list.push(slab);
    this.counts.idleBytes += slab.length;
  }

  stats(): PayloadPoolStats {
    return { ...this.counts };
  }
}
