// The daemon's event-loop delay: how late a 1 ms timer fires, which is how long the loop
// was kept busy by one turn of work. A daemon whose loop stalls answers nothing meanwhile
// (QMP, heartbeats, NBD), so this is the figure behind "no request stalls a daemon".
// Reported by `x-query-event-loop-delay` (docs/architecture.md).

import { monitorEventLoopDelay, type IntervalHistogram } from 'node:perf_hooks';

export const LOOP_DELAY_RESOLUTION_MS = 1;

export interface LoopDelayReport {
  'resolution-ms': number;
  /** when measuring began (daemon start or the last reset), ISO 8601 */
  since: string;
  samples: number;
  'mean-ms': number;
  'p50-ms': number;
  'p99-ms': number;
  'p999-ms': number;
  'max-ms': number;
}

const ms = (ns: number): number => Math.round(ns / 1e3) / 1e3;

export class LoopDelayMonitor {
  private readonly h: IntervalHistogram;
  private since = new Date();

  constructor() {
    // native timer (no JavaScript per tick), unref'd: it keeps no process alive
    this.h = monitorEventLoopDelay({ resolution: LOOP_DELAY_RESOLUTION_MS });
    this.h.enable();
  }

  report(): LoopDelayReport {
    const h = this.h;
    const n = h.count;
    return {
      'resolution-ms': LOOP_DELAY_RESOLUTION_MS,
      since: this.since.toISOString(),
      samples: n,
      'mean-ms': n > 0 ? ms(h.mean) : 0,
      'p50-ms': n > 0 ? ms(h.percentile(50)) : 0,
      'p99-ms': n > 0 ? ms(h.percentile(99)) : 0,
      'p999-ms': n > 0 ? ms(h.percentile(99.9)) : 0,
      'max-ms': n > 0 ? ms(h.max) : 0,
    };
  }

  reset(): void {
    this.h.reset();
    this.since = new Date();
  }

  close(): void {
    this.h.disable();
  }
}
