// A dirty bitmap over a byte range with a fixed granularity: one bit per `granularity`
// bytes, the last bit possibly covering a shorter tail. Used by copy-before-write (set =
// "not copied yet"), mirror and commit (set = "dirty, copy again").

import { assert } from '../errors.js';

export interface ByteRange {
  offset: number;
  length: number;
}

export class Bitmap {
  readonly bits: number;
  private readonly words: Uint32Array;
  private setCount = 0;

  constructor(
    /** bytes covered */
    readonly size: number,
    /** bytes per bit; a positive integer */
    readonly granularity: number,
  ) {
    assert(Number.isSafeInteger(size) && size >= 0, `bitmap size ${size}`);
    assert(Number.isSafeInteger(granularity) && granularity > 0, `bitmap granularity ${granularity}`);
    this.bits = Math.ceil(size / granularity);
    this.words = new Uint32Array(Math.ceil(this.bits / 32));
  }

  /** Number of set bits. */
  get count(): number {
    return this.setCount;
  }

  /** Bytes covered by set bits (the short last bit counts its real length). */
  get dirtyBytes(): number {
    let bytes = this.setCount * this.granularity;
    if (this.bits > 0 && this.get(this.bits - 1)) bytes -= this.bits * this.granularity - this.size;
    return bytes;
  }

  get(bit: number): boolean {
    return ((this.words[bit >>> 5]! >>> (bit & 31)) & 1) === 1;
  }

  private setBit(bit: number, value: boolean): void {
    const w = bit >>> 5;
    const mask = 1 << (bit & 31);
    const cur = (this.words[w]! & mask) !== 0;
    if (cur === value) return;
    this.words[w] = value ? this.words[w]! | mask : this.words[w]! & ~mask;
    this.setCount += value ? 1 : -1;
  }

  /** First and one-past-last bit overlapping [offset, offset+length). */
  bitSpan(offset: number, length: number): [number, number] {
    const first = Math.floor(offset / this.granularity);
    const end = Math.min(this.bits, Math.ceil((offset + length) / this.granularity));
    return [first, end];
  }

  /** Sets every bit overlapping the range. */
  setRange(offset: number, length: number): void {
    const [a, b] = this.bitSpan(offset, length);
    for (let i = a; i < b; i++) this.setBit(i, true);
  }

  /** Clears every bit overlapping the range. */
  resetRange(offset: number, length: number): void {
    const [a, b] = this.bitSpan(offset, length);
    for (let i = a; i < b; i++) this.setBit(i, false);
  }

  setBits(first: number, end: number, value: boolean): void {
    for (let i = first; i < end; i++) this.setBit(i, value);
  }

  setAll(): void {
    this.words.fill(0xffffffff);
    const tail = this.bits & 31;
    if (tail !== 0) this.words[this.words.length - 1] = (2 ** tail - 1) >>> 0;
    this.setCount = this.bits;
  }

  clearAll(): void {
    this.words.fill(0);
    this.setCount = 0;
  }

  /** True if any bit overlapping the range is set. */
  anySet(offset: number, length: number): boolean {
    const [a, b] = this.bitSpan(offset, length);
    const n = this.nextSet(a);
    return n !== -1 && n < b;
  }

  /** Index of the first set bit at or after `from`, or -1. */
  nextSet(from: number): number {
    for (let i = Math.max(0, from); i < this.bits; ) {
      const w = this.words[i >>> 5]! >>> (i & 31);
      if (w === 0) {
        i = ((i >>> 5) + 1) << 5;
        continue;
      }
      const bit = i + (31 - Math.clz32(w & -w));
      return bit < this.bits ? bit : -1;
    }
    return -1;
  }

  /** Index of the first clear bit at or after `from`, or `bits` when none. */
  nextClear(from: number): number {
    for (let i = Math.max(0, from); i < this.bits; ) {
      const w = ~this.words[i >>> 5]! >>> (i & 31);
      if (w === 0) {
        i = ((i >>> 5) + 1) << 5;
        continue;
      }
      const bit = i + (31 - Math.clz32(w & -w));
      return Math.min(bit, this.bits);
    }
    return this.bits;
  }

  /** Byte range of bits [first, end), clipped to the size. */
  byteRange(first: number, end: number): ByteRange {
    const offset = first * this.granularity;
    return { offset, length: Math.min(this.size, end * this.granularity) - offset };
  }

  /** Makes this bitmap's bits equal to `other`'s (same size and granularity). */
  assign(other: Bitmap): void {
    assert(other.bits === this.bits, 'bitmap sizes differ');
    this.words.set(other.words);
    this.setCount = other.setCount;
  }

  /** Clears every bit that is clear in `other` (same size and granularity). */
  intersect(other: Bitmap): void {
    assert(other.bits === this.bits, 'bitmap sizes differ');
    let n = 0;
    for (let w = 0; w < this.words.length; w++) {
      const v = (this.words[w]! & other.words[w]!) >>> 0;
      this.words[w] = v;
      n += popcount(v);
    }
    this.setCount = n;
  }

  /** Sets every bit that is set in `other` (same size and granularity). */
  union(other: Bitmap): void {
    assert(other.bits === this.bits, 'bitmap sizes differ');
    let n = 0;
    for (let w = 0; w < this.words.length; w++) {
      const v = (this.words[w]! | other.words[w]!) >>> 0;
      this.words[w] = v;
      n += popcount(v);
    }
    this.setCount = n;
  }

  /** Bytes needed to serialise the bits (toBytes). */
  get byteLength(): number {
    return Math.ceil(this.bits / 8);
  }

  /**
   * Bytes [from, to) of the serialised form: bit i is bit (i % 8) of byte i / 8, the least
   * significant first, independent of the host's byte order; bits past the end are zero.
   */
  toBytes(from = 0, to = this.byteLength): Buffer {
    const out = Buffer.alloc(to - from);
    for (let b = from; b < to; b++) out[b - from] = (this.words[b >>> 2]! >>> ((b & 3) * 8)) & 0xff;
    return out;
  }

  /** Loads the serialised form (toBytes); bits past the end are ignored. */
  loadBytes(bytes: Uint8Array): void {
    assert(bytes.length === this.byteLength, 'bitmap byte length');
    this.words.fill(0);
    for (let b = 0; b < bytes.length; b++) {
      let v = bytes[b]!;
      if (b === bytes.length - 1 && (this.bits & 7) !== 0) v &= (1 << (this.bits & 7)) - 1;
      this.words[b >>> 2] = (this.words[b >>> 2]! | (v << ((b & 3) * 8))) >>> 0;
    }
    let n = 0;
    for (let w = 0; w < this.words.length; w++) n += popcount(this.words[w]!);
    this.setCount = n;
  }

  /** Set runs as byte ranges, in order. */
  *runs(): Generator<ByteRange> {
    for (let i = this.nextSet(0); i !== -1; ) {
      const end = this.nextClear(i);
      yield this.byteRange(i, end);
      i = end >= this.bits ? -1 : this.nextSet(end);
    }
  }
}

function popcount(v: number): number {
  v = v - ((v >>> 1) & 0x55555555);
  v = (v & 0x33333333) + ((v >>> 2) & 0x33333333);
  return (((v + (v >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
}
