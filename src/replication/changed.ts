// Regions the primary changed since the last checkpoint the secondary confirmed. While the
// pair is protected the supervisor resets it inside every checkpoint's barrier; once the
// secondary is gone it keeps growing, and a later re-protection copies only these regions
// instead of the whole disk. Granularity is 64 KiB (a qcow2 cluster), kept as a bitmap.

export const CHANGED_GRANULARITY = 65536;

export interface ChangedRegion {
  offset: number;
  length: number;
}

export class ChangedMap {
  private bits: Uint8Array;
  private count = 0;
  /** wall-clock time of the last reset (ms since the epoch) */
  since = Date.now();

  constructor(private length: number) {
    this.bits = new Uint8Array(Math.ceil(Math.ceil(length / CHANGED_GRANULARITY) / 8));
  }

  mark(offset: number, length: number): void {
    if (length <= 0) return;
    const end = offset + length;
    if (end > this.length) this.grow(end);
    const first = Math.floor(offset / CHANGED_GRANULARITY);
    const last = Math.floor((end - 1) / CHANGED_GRANULARITY);
    for (let c = first; c <= last; c++) {
      const byte = c >> 3;
      const bit = 1 << (c & 7);
      if ((this.bits[byte]! & bit) === 0) {
        this.bits[byte]! |= bit;
        this.count++;
      }
    }
  }

  private grow(length: number): void {
    const bits = new Uint8Array(Math.ceil(Math.ceil(length / CHANGED_GRANULARITY) / 8));
    bits.set(this.bits);
    this.bits = bits;
    this.length = length;
  }

  reset(): void {
    this.bits.fill(0);
    this.count = 0;
    this.since = Date.now();
  }

  /** bytes covered by changed granules (the last one clipped to the disk's end) */
  bytes(): number {
    let total = 0;
    for (const r of this.regions()) total += r.length;
    return total;
  }

  get granules(): number {
    return this.count;
  }

  /** Changed regions, adjacent granules merged, in offset order. */
  regions(): ChangedRegion[] {
    const out: ChangedRegion[] = [];
    if (this.count === 0) return out;
    const n = Math.ceil(this.length / CHANGED_GRANULARITY);
    let start = -1;
    for (let c = 0; c <= n; c++) {
      const set = c < n && (this.bits[c >> 3]! & (1 << (c & 7))) !== 0;
      if (set && start < 0) start = c;
      else if (!set && start >= 0) {
        const offset = start * CHANGED_GRANULARITY;
        out.push({ offset, length: Math.min(c * CHANGED_GRANULARITY, this.length) - offset });
        start = -1;
      }
    }
    return out;
  }
}
