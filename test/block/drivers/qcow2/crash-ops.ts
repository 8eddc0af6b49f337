// The deterministic operations of the crash test (shared by the writer and the checker).

export type CrashOp = { kind: 'write'; offset: number; data: Buffer } | { kind: 'discard'; offset: number; length: number };

/** xorshift32 */
function rng(seed: number): () => number {
  let x = (seed * 2654435761) >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 0x100000000;
  };
}

export function crashOp(seed: number, size: number): CrashOp {
  const r = rng(seed);
  const length = 1 + Math.floor(r() * 3 * 4096 * 4);
  const offset = Math.floor(r() * (size - length));
  if (r() < 0.1) return { kind: 'discard', offset, length };
  const data = Buffer.alloc(length);
  for (let i = 0; i < length; i++) data[i] = (seed * 131 + i * 7 + (i >> 9)) & 0xff;
  return { kind: 'write', offset, data };
}
