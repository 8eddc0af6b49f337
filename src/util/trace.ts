// A latency trace for profiling the data path (issue 18): with LOCKSTEP_TRACE=<directory> in
// its environment, a process records spans (name, offset, start, duration) of the request
// steps that call `span`, and the delays of its event loop, and writes them at exit to
// <directory>/trace-<pid>.tsv. Start times are wall-clock milliseconds (performance.timeOrigin
// based), so the traces of two daemons on one host line up. Off (the default), `span`
// returns its promise untouched and nothing else runs.

import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { PerformanceObserver } from 'node:perf_hooks';

const dir = process.env.LOCKSTEP_TRACE ?? '';
export const tracing = dir !== '';

/** at most this many spans are kept (the first ones): a bounded memory cost */
const MAX_SPANS = 2_000_000;
const names: string[] = [];
const offsets: number[] = [];
const starts: number[] = [];
const durs: number[] = [];

const now = (): number => performance.timeOrigin + performance.now();

/** Records one finished span. */
export function record(name: string, offset: number, start: number, end: number): void {
  if (names.length >= MAX_SPANS) return;
  names.push(name);
  offsets.push(offset);
  starts.push(start);
  durs.push(end - start);
}

/** The current time in the trace's clock (0 when not tracing). */
export function traceNow(): number {
  return tracing ? now() : 0;
}

/** Times `p` as span `name` at `offset` (a request's offset, -1 for none). */
export function span<T>(name: string, offset: number, p: Promise<T>): Promise<T> {
  if (!tracing) return p;
  const t0 = now();
  const end = (): void => record(name, offset, t0, now());
  p.then(end, end);
  return p;
}

if (tracing) {
  // event-loop delay: a 1 ms timer that records how late it ran when more than 2 ms late
  let last = now();
  const lag = setInterval(() => {
    const t = now();
    if (t - last > 3) record('loop.lag', -1, last + 1, t);
    last = t;
  }, 1);
  lag.unref();
  // garbage collections: each pause, by kind (minor, major, incremental, weak callbacks)
  const gc = new PerformanceObserver((list) => {
    for (const e of list.getEntries()) {
      const kind = (e as PerformanceEntry & { detail?: { kind?: number } }).detail?.kind ?? 0;
      record(`gc.${kind}`, -1, performance.timeOrigin + e.startTime, performance.timeOrigin + e.startTime + e.duration);
    }
  });
  gc.observe({ entryTypes: ['gc'] });
  process.once('exit', () => {
    try {
      mkdirSync(dir, { recursive: true });
      const lines: string[] = [`#\t${process.argv.join(' ')}`];
      for (let i = 0; i < names.length; i++) lines.push(`${names[i]}\t${offsets[i]}\t${starts[i]!.toFixed(3)}\t${durs[i]!.toFixed(3)}`);
      writeFileSync(join(dir, `trace-${process.pid}.tsv`), lines.join('\n') + '\n');
    } catch {
      // a trace is best effort
    }
  });
}
