// Lease fencing for the primary's served node (issue 17). The daemon admits and acknowledges
// writes (and flushes) to the node only while it holds a lease, measured on its own
// monotonic clock. The supervisor renews it with each heartbeat (x-block-lease); when it runs
// out, writes wait (on-expiry suspend-io, the default) or fail with EIO (io-error), and
// X_BLOCK_LEASE_EXPIRED says so. A renewal lets held writes go on (X_BLOCK_LEASE_RESUMED);
// x-block-lease-demote fails them, and every later one: they never land, and nothing that
// landed before is acknowledged after the demotion.
//
// A renewal names its start on the daemon's clock (`since`, a `clock` value the daemon itself
// returned earlier), so a renewal delayed in the network grants nothing beyond
// since + duration: the supervisor knows the lease ends by (when it received that clock
// value) + duration, scaled by a margin for clock rate, whatever happens to later renewals.
// Reads are not fenced.

import { monitorEventLoopDelay, type IntervalHistogram } from 'node:perf_hooks';
import type { IoGate } from '../block/gate.js';
import type { BlockNode } from '../block/node.js';
import { BlockError, InvalidArgumentError, StateError } from '../errors.js';

export const LEASE_GATE = 'lease';
export const LEASE_EXPIRED_EVENT = 'X_BLOCK_LEASE_EXPIRED';
export const LEASE_RESUMED_EVENT = 'X_BLOCK_LEASE_RESUMED';
export type LeaseExpiry = 'suspend-io' | 'io-error';

interface Held {
  resolve(): void;
  reject(e: Error): void;
}

export interface LeaseStatus {
  'node-name': string;
  /** the daemon's monotonic clock now, ms */
  clock: number;
  /** when the lease runs out on that clock */
  deadline: number;
  valid: boolean;
  demoted: boolean;
  'on-expiry': LeaseExpiry;
  /** writes, write completions and flush completions waiting for a renewal */
  held: number;
  expiries: number;
  renewals: number;
  /** the least lease time left when a renewal arrived (how close the lease came to lapsing) */
  'min-remaining-ms': number | null;
  /** the daemon's event-loop delay since the lease was first granted, ms */
  'loop-delay-p99-ms': number;
  'loop-delay-max-ms': number;
}

export class Lease implements IoGate {
  readonly order = 20;
  private deadline = 0;
  private demoted = false;
  private expiredReported = false;
  private held: Held[] = [];
  private timer: NodeJS.Timeout | null = null;
  private expiries = 0;
  private renewals = 0;
  private minRemaining: number | null = null;
  private readonly loopDelay: IntervalHistogram = monitorEventLoopDelay({ resolution: 10 });

  constructor(
    readonly node: BlockNode,
    public onExpiry: LeaseExpiry,
    private readonly emitEvent: (name: string, data: Record<string, unknown>) => void,
  ) {
    this.loopDelay.enable();
  }

  get valid(): boolean {
    return !this.demoted && performance.now() < this.deadline;
  }

  /** Grants or renews: the lease runs until since + durationMs on this daemon's clock. */
  grant(durationMs: number, since: number | undefined): { clock: number; deadline: number } {
    if (this.demoted) throw new StateError(`node '${this.node.name}' was demoted: its lease cannot be renewed`);
    if (!(durationMs > 0) || !Number.isFinite(durationMs)) throw new InvalidArgumentError("Parameter 'duration-ms' must be a positive number");
    const now = performance.now();
    if (since !== undefined && (!Number.isFinite(since) || since < 0 || since > now)) {
      throw new InvalidArgumentError(`Parameter 'since' must be a clock value this daemon returned (0 to ${Math.floor(now)})`);
    }
    if (this.renewals > 0) {
      const left = this.deadline - now;
      this.minRemaining = this.minRemaining === null ? left : Math.min(this.minRemaining, left);
    }
    this.renewals++;
    // never shortened: a late, older renewal must not cut a newer one
    this.deadline = Math.max(this.deadline, (since ?? now) + durationMs);
    if (this.valid) this.resume();
    this.arm();
    return { clock: now, deadline: this.deadline };
  }

  private arm(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    const left = this.deadline - performance.now();
    if (left <= 0) {
      this.reportExpired();
      return;
    }
    this.timer = setTimeout(() => this.arm(), Math.ceil(left));
    this.timer.unref();
  }

  private reportExpired(): void {
    if (this.expiredReported || this.demoted) return;
    this.expiredReported = true;
    this.expiries++;
    this.emitEvent(LEASE_EXPIRED_EVENT, { 'node-name': this.node.name, 'on-expiry': this.onExpiry });
  }

  private resume(): void {
    const h = this.held;
    this.held = [];
    if (this.expiredReported) {
      this.expiredReported = false;
      this.emitEvent(LEASE_RESUMED_EVENT, { 'node-name': this.node.name, held: h.length });
    }
    for (const x of h) x.resolve();
  }

  /** Writes may go on only with a valid lease: wait for a renewal, or fail. */
  private check(): Promise<void> | void {
    if (this.valid) return;
    if (this.demoted) return Promise.reject(this.fenced());
    this.reportExpired();
    if (this.onExpiry === 'io-error') {
      return Promise.reject(new BlockError('EIO', `the lease on node '${this.node.name}' ran out (on-expiry io-error)`));
    }
    return new Promise<void>((resolve, reject) => this.held.push({ resolve, reject }));
  }

  admitWrite(): Promise<void> | void {
    return this.check();
  }
  completeWrite(): Promise<void> | void {
    return this.check();
  }
  completeFlush(): Promise<void> | void {
    return this.check();
  }

  private fenced(): BlockError {
    return new BlockError('EIO', `node '${this.node.name}' was demoted: writes to it are fenced`);
  }

  /** No longer primary: what is held fails, and so does every later write. */
  demote(): number {
    this.demoted = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    const h = this.held;
    this.held = [];
    const e = this.fenced();
    for (const x of h) x.reject(e);
    return h.length;
  }

  close(): void {
    // a lease is never switched off while its node lives; a closing node fences what waits
    this.demote();
    this.loopDelay.disable();
  }

  status(): LeaseStatus {
    const ms = (ns: number) => Math.round(ns / 1e4) / 100;
    return {
      'node-name': this.node.name,
      clock: performance.now(),
      deadline: this.deadline,
      valid: this.valid,
      demoted: this.demoted,
      'on-expiry': this.onExpiry,
      held: this.held.length,
      expiries: this.expiries,
      renewals: this.renewals,
      'min-remaining-ms': this.minRemaining === null ? null : Math.round(this.minRemaining * 100) / 100,
      'loop-delay-p99-ms': this.loopDelay.count > 0 ? ms(this.loopDelay.percentile(99)) : 0,
      'loop-delay-max-ms': this.loopDelay.count > 0 ? ms(this.loopDelay.max) : 0,
    };
  }
}
