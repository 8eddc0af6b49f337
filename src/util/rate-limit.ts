// Token bucket for job speed limits (bytes per second, 0 = unlimited). Work is accounted
// after it is dispatched, so one large chunk may overdraw the bucket; the debt is paid by
// waiting before the next one. The burst is one 100 ms slice, as in QEMU's ratelimit.

const SLICE_MS = 100;

export class RateLimit {
  private tokens = 0;
  private lastMs = 0;
  private bytesPerSecond = 0;

  constructor(speed = 0) {
    this.setSpeed(speed);
  }

  get speed(): number {
    return this.bytesPerSecond;
  }

  setSpeed(speed: number): void {
    this.bytesPerSecond = speed;
    this.tokens = 0;
    this.lastMs = performance.now();
  }

  private refill(now: number): void {
    if (this.bytesPerSecond === 0) return;
    const burst = (this.bytesPerSecond * SLICE_MS) / 1000;
    const elapsed = Math.max(0, now - this.lastMs);
    this.tokens = Math.min(burst, this.tokens + (elapsed * this.bytesPerSecond) / 1000);
    this.lastMs = Math.max(this.lastMs, now);
  }

  /** Milliseconds to wait before dispatching more work (0: go now). */
  delayMs(now = performance.now()): number {
    if (this.bytesPerSecond === 0) return 0;
    this.refill(now);
    return this.tokens >= 0 ? 0 : (-this.tokens * 1000) / this.bytesPerSecond;
  }

  account(bytes: number, now = performance.now()): void {
    if (this.bytesPerSecond === 0) return;
    this.refill(now);
    this.tokens -= bytes;
  }
}
