// Lease fencing in the pair (issue 17): the primary daemon admits and acknowledges writes to
// the served disk only while it holds a lease (src/replication/lease.ts), renewed here every
// heartbeat interval on a timer of its own (a slow secondary's heartbeat never delays it).
//
// Each renewal counts from a clock value the daemon returned in its previous reply, so the
// daemon's lease ends by (the moment this supervisor received that value) + the duration, in
// the daemon's time; scaled by a clock-rate margin, that bounds it on our clock whatever
// happens to renewals still in flight. Failover serves the recovered disk only after that
// bound (expiredBy()): the old primary can no longer acknowledge a write by then.
//
// The default duration is the heartbeat timeout: detection already waits that long after the
// last answer, so the failover waits for nothing more on a healthy clock, and the lease
// lapses only if renewals stop for about timeout - interval (400 ms by default), far above
// the event-loop delay measured on a loaded primary (docs/benchmarks.md).
//
// Once the lease has run out, writes wait for a renewal ('hold') or fail with EIO at once
// ('io-error'): DRBD's on-no-quorum suspend-io and io-error, the daemon's on-expiry
// suspend-io and io-error. Sent with every grant, so an adopted primary takes this
// supervisor's choice.

import type { PairCore } from './core.js';
import type { Side } from './sides.js';
import { DISK_NODE } from './setup.js';
import type { LeaseExpiry } from '../replication/lease.js';

/** What the primary does with writes once its lease ran out (`--on-lease-expiry`). */
export type PairLeaseExpiry = 'hold' | 'io-error';
export const LEASE_EXPIRY_DEFAULT: PairLeaseExpiry = 'hold';

/** the daemon's on-expiry for each choice (x-block-lease) */
const ON_EXPIRY: Record<PairLeaseExpiry, LeaseExpiry> = { hold: 'suspend-io', 'io-error': 'io-error' };

/** `--on-lease-expiry`: hold or io-error; DRBD's name suspend-io is taken for hold. */
export function parseLeaseExpiry(text: string, name = '--on-lease-expiry'): PairLeaseExpiry {
  if (text === 'hold' || text === 'suspend-io') return 'hold';
  if (text === 'io-error') return 'io-error';
  throw new Error(`${name}: expected hold (or suspend-io) or io-error, got '${text}'`);
}

/** What the lease reads of the supervisor: its core and the pair's onLeaseExpiry option. */
export interface PairLeaseHost extends PairCore {
  readonly opts: { readonly onLeaseExpiry?: PairLeaseExpiry };
}

/** Clocks may run at different rates: allow 1 % (NTP slews by at most 0.05 %). */
export const LEASE_RATE_MARGIN = 0.01;
/** plus a fixed margin for the timer that ends the wait */
export const LEASE_FIXED_MARGIN_MS = 20;

export class PairLease {
  private timer: NodeJS.Timeout | null = null;
  /** the daemon's clock in its last reply, and when we received it (our monotonic clock) */
  private clock: number | null = null;
  private clockAt = 0;
  /** the latest receipt time of a clock value we handed out: the lease ends by this + duration */
  private base: number | null = null;
  private inFlight = false;
  private side: Side | null = null;

  constructor(
    private readonly core: PairLeaseHost,
    readonly durationMs: number,
    private readonly intervalMs: number,
  ) {}

  /** writes once the lease ran out */
  get onExpiry(): PairLeaseExpiry {
    return this.core.opts.onLeaseExpiry ?? LEASE_EXPIRY_DEFAULT;
  }

  /** The first grant; then renewals every interval until stop(). */
  async start(p: Side): Promise<void> {
    this.side = p;
    const r = (await this.core.call(p, 'x-block-lease', this.args())) as { clock: number };
    // granted from its arrival, which came before this reply
    this.clock = r.clock;
    this.clockAt = this.base = performance.now();
    this.timer = setInterval(() => void this.renew(), this.intervalMs);
  }

  private async renew(): Promise<void> {
    const p = this.side;
    if (!p || !p.alive || this.inFlight || this.clock === null) return;
    this.inFlight = true;
    this.base = Math.max(this.base ?? 0, this.clockAt);
    try {
      const r = (await this.core.call(p, 'x-block-lease', { ...this.args(), since: this.clock })) as { clock: number };
      this.clock = r.clock;
      this.clockAt = performance.now();
    } catch {
      // a missed renewal is the heartbeat's business; the bound below stays right
    } finally {
      this.inFlight = false;
    }
  }

  private args(): Record<string, unknown> {
    return { 'node-name': DISK_NODE, 'duration-ms': this.durationMs, 'on-expiry': ON_EXPIRY[this.onExpiry] };
  }

  /** Stops renewing (the primary is lost or demoted). */
  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    this.side = null;
  }

  /** performance.now() after which the old primary's lease has certainly run out. */
  expiredBy(): number {
    if (this.base === null) return 0;
    return this.base + this.durationMs * (1 + LEASE_RATE_MARGIN) + LEASE_FIXED_MARGIN_MS;
  }

  /** Stops renewing and waits until the lease has certainly run out; returns the wait, ms. */
  async waitExpired(): Promise<number> {
    this.stop();
    const wait = Math.max(0, this.expiredBy() - performance.now());
    if (wait > 0) await new Promise((r) => setTimeout(r, Math.ceil(wait)));
    return wait;
  }
}
