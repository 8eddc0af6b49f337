// The daemon's event-loop delay: how late a 1 ms timer fires, which is how long the loop
// was kept busy by one turn of work. A daemon whose loop stalls answers nothing meanwhile
// (QMP, heartbeats, NBD), so this is the figure behind "no request stalls a daemon".
// Reported by `x-query-event-loop-delay` (docs/architecture.md).
//
// On a loaded machine the delay also holds the time the daemon waited for a CPU (preempted in
// the middle of a turn, or woken late), which the daemon cannot help. So beside it, `turn-cpu`:
// the CPU time the loop's own thread consumed between two ticks of a 1 ms timer (the thread's
// CPU clock, from the native helper), which waiting for a CPU does not inflate: the turns' own
// cost, V8's garbage collections on the main thread included.

import { monitorEventLoopDelay, type IntervalHistogram } from 'node:perf_hooks';
import { threadCpuUnavailableReason, turnCpuHistogram, type TurnCpuFigures } from './native.js';

export const LOOP_DELAY_RESOLUTION_MS = 1;

/** A histogram's figures, in milliseconds */
interface MsFigures {
  samples: number;
  'mean-ms': number;
  'p50-ms': number;
  'p99-ms': number;
  'p999-ms': number;
  'max-ms': number;
}

/** CPU milliseconds the loop's thread consumed between two ticks of a 1 ms timer */
export type TurnCpuReport = MsFigures;

export interface LoopDelayReport extends MsFigures {
  'resolution-ms': number;
  /** when measuring began (daemon start or the last reset), ISO 8601 */
  since: string;
  /** absent when the thread's CPU clock is not available; turn-cpu-unavailable says why */
  'turn-cpu'?: TurnCpuReport;
  'turn-cpu-unavailable'?: string;
}

const ms = (ns: number): number => Math.round(ns / 1e3) / 1e3;

function cpuReport(f: TurnCpuFigures): TurnCpuReport {
  return {
    samples: f.count,
    'mean-ms': ms(f.meanNs),
    'p50-ms': ms(f.p50Ns),
    'p99-ms': ms(f.p99Ns),
    'p999-ms': ms(f.p999Ns),
    'max-ms': ms(f.maxNs),
  };
}

export class LoopDelayMonitor {
  private readonly h: IntervalHistogram;
  private readonly cpu: ReturnType<typeof turnCpuHistogram>;
  private readonly cpuUnavailable: string;
  private since = new Date();

  constructor() {
    // native timer (no JavaScript per tick), unref'd: it keeps no process alive
    this.h = monitorEventLoopDelay({ resolution: LOOP_DELAY_RESOLUTION_MS });
    this.h.enable();
    // the same, native too (a JavaScript timer every millisecond cost 2.5% of a core)
    this.cpu = turnCpuHistogram(LOOP_DELAY_RESOLUTION_MS);
    this.cpuUnavailable = this.cpu ? '' : (threadCpuUnavailableReason() ?? 'the turn CPU histogram did not start');
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
      ...(this.cpu ? { 'turn-cpu': cpuReport(this.cpu.read(false)) } : { 'turn-cpu-unavailable': this.cpuUnavailable }),
    };
  }

  reset(): void {
    this.h.reset();
    this.cpu?.read(true);
    this.since = new Date();
  }

  close(): void {
    this.h.disable();
    this.cpu?.stop();
  }
}
