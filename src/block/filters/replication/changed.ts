// Regions the primary changed since the last checkpoint the secondary confirmed. While the
// pair is protected the supervisor resets it inside every checkpoint's barrier; once the
// secondary is gone it keeps growing, and a later re-protection copies only these regions
// instead of the whole disk. Granularity is 64 KiB (a qcow2 cluster).

import { Bitmap, type ByteRange } from '../../../util/bitmap.js';

export const CHANGED_GRANULARITY = 65536;

export type ChangedRegion = ByteRange;

export class ChangedMap {
  private map: Bitmap;
  /** wall-clock time of the last reset (ms since the epoch) */
  since = Date.now();

  constructor(length: number) {
    this.map = new Bitmap(length, CHANGED_GRANULARITY);
  }

  mark(offset: number, length: number): void {
    if (length <= 0) return;
    // a disk that grew: the bitmap follows, keeping what it holds
    if (offset + length > this.map.size) {
      const bigger = new Bitmap(offset + length, CHANGED_GRANULARITY);
      for (const r of this.map.runs()) bigger.setRange(r.offset, r.length);
      this.map = bigger;
    }
    this.map.setRange(offset, length);
  }

  reset(): void {
    this.map.clearAll();
    this.since = Date.now();
  }

  /** bytes covered by changed granules (the last one clipped to the disk's end) */
  bytes(): number {
    return this.map.dirtyBytes;
  }

  get granules(): number {
    return this.map.count;
  }

  /** Changed regions, adjacent granules merged, in offset order. */
  regions(): ChangedRegion[] {
    return [...this.map.runs()];
  }
}
