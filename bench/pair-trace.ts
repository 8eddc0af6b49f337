// bench/pair-trace: where the slow writes and pauses of a traced pair go (issue 18).
//
// Run a pair with LOCKSTEP_TRACE=<dir> in the environment (bench/pair passes it on to the
// daemons the supervisor starts; src/util/trace.ts writes one file per process at exit), then
//   node dist/bench/pair-trace.js <dir> [--match lockstep-40-4k] [--slow-ms 5]
// For each traced pair (the primary and secondary daemons whose monitor sockets share a
// directory whose name contains --match), the guest's writes at the primary's NBD server
// slower than --slow-ms are lined up with the spans of the same offset on both daemons (each
// node's write, the dirty log's persist, qcow2's mutex waits, the forward's NBD write, the
// copy-before-write) and with what else ran on either daemon meanwhile (event-loop delays,
// flushes, QMP commands). Prints, per step, the median and p90 over the slow writes and how
// often that step took more than half of the write's time; then the same for the QMP commands
// of the checkpoints.

import { readFileSync, readdirSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { quantile } from './pair/util.js';

interface Span {
  name: string;
  offset: number;
  start: number;
  dur: number;
}

interface Trace {
  argv: string;
  spans: Span[];
}

function load(path: string): Trace {
  const lines = readFileSync(path, 'utf8').split('\n');
  const argv = lines[0]!.startsWith('#\t') ? lines[0]!.slice(2) : '';
  const spans: Span[] = [];
  for (const l of lines) {
    if (l === '' || l.startsWith('#')) continue;
    const [name, offset, start, dur] = l.split('\t');
    spans.push({ name: name!, offset: Number(offset), start: Number(start), dur: Number(dur) });
  }
  return { argv, spans };
}

/** The directory of the daemon's monitor socket, and its role, from its argv. */
function roleOf(argv: string): { dir: string; role: string } | null {
  const m = /path=([^,\s]+)\/(primary|secondary)\.qmp/.exec(argv);
  return m ? { dir: m[1]!, role: m[2]! } : null;
}

/** Spans of `t` whose name is `name` and that overlap [a, b). */
function overlapping(t: Trace, pred: (s: Span) => boolean, a: number, b: number): Span[] {
  return t.spans.filter((s) => pred(s) && s.start < b && s.start + s.dur > a);
}

const f2 = (x: number) => (Number.isFinite(x) ? x.toFixed(2) : '-');

function report(primary: Trace, secondary: Trace, slowMs: number): void {
  // index spans by offset for the lookups
  const byOffset = (t: Trace) => {
    const m = new Map<number, Span[]>();
    for (const s of t.spans) {
      if (s.offset < 0) continue;
      let l = m.get(s.offset);
      if (!l) m.set(s.offset, (l = []));
      l.push(s);
    }
    return m;
  };
  const pIdx = byOffset(primary);
  const sIdx = byOffset(secondary);
  const writes = primary.spans.filter((s) => s.name === 'nbd.write');
  const slow = writes.filter((s) => s.dur > slowMs);
  console.log(`  ${writes.length} guest writes traced, ${slow.length} over ${slowMs} ms (${f2((100 * slow.length) / writes.length)}%); ` +
    `all: p50 ${f2(quantile(writes.map((s) => s.dur), 0.5))} p99 ${f2(quantile(writes.map((s) => s.dur), 0.99))} ms`);
  const steps = new Map<string, number[]>();
  const dominant = new Map<string, number>();
  const add = (k: string, v: number, total: number) => {
    let l = steps.get(k);
    if (!l) steps.set(k, (l = []));
    l.push(v);
    if (v > total / 2) dominant.set(k, (dominant.get(k) ?? 0) + 1);
  };
  for (const w of slow) {
    const a = w.start;
    const b = w.start + w.dur;
    const within = (idx: Map<number, Span[]>, side: string) => {
      const seen = new Map<string, number>();
      for (const s of idx.get(w.offset) ?? []) {
        if (s.name === 'nbd.write' && side === 'P') continue;
        if (s.start < a - 0.01 || s.start > b) continue;
        const k = `${side} ${s.name}`;
        seen.set(k, Math.max(seen.get(k) ?? 0, s.dur));
      }
      for (const [k, v] of seen) add(k, v, w.dur);
    };
    within(pIdx, 'P');
    within(sIdx, 'S');
    // what ran meanwhile on each daemon, in ms overlapping this write
    for (const [side, t] of [['P', primary], ['S', secondary]] as const) {
      const clip = (s: Span) => Math.min(b, s.start + s.dur) - Math.max(a, s.start);
      const sum = (xs: Span[]) => xs.reduce((x, s) => x + clip(s), 0);
      add(`${side} (event-loop delay overlapping)`, sum(overlapping(t, (s) => s.name === 'loop.lag', a, b)), w.dur);
      add(`${side} (flush overlapping)`, Math.min(w.dur, sum(overlapping(t, (s) => s.name.startsWith('f ') && s.name.includes(' file '), a, b))), w.dur);
      add(`${side} (QMP command overlapping)`, Math.min(w.dur, sum(overlapping(t, (s) => s.name.startsWith('qmp '), a, b))), w.dur);
    }
  }
  console.log('\n  | step (P primary, S secondary) | slow writes with it | median ms | p90 ms | max ms | > half the write |\n  |---|---|---|---|---|---|');
  const rows = [...steps.entries()].sort((x, y) => quantile(y[1], 0.5) - quantile(x[1], 0.5));
  for (const [k, v] of rows) {
    console.log(`  | ${k} | ${v.length} | ${f2(quantile(v, 0.5))} | ${f2(quantile(v, 0.9))} | ${f2(quantile(v, 1))} | ${dominant.get(k) ?? 0} |`);
  }
  // the loop delays and long file syncs in all, on each side
  for (const [side, t] of [['primary', primary], ['secondary', secondary]] as const) {
    const lag = t.spans.filter((s) => s.name === 'loop.lag').map((s) => s.dur);
    const fl = t.spans.filter((s) => s.name.startsWith('f ')).map((s) => s.dur);
    const dl = t.spans.filter((s) => s.name === 'dlog.persist').map((s) => s.dur);
    console.log(`  ${side}: event-loop delays > 3 ms: ${lag.length} (p50 ${f2(quantile(lag, 0.5))}, max ${f2(quantile(lag, 1))} ms, ${f2(lag.reduce((x, y) => x + y, 0))} ms in all); ` +
      `flushes ${fl.length} (p50 ${f2(quantile(fl, 0.5))}, max ${f2(quantile(fl, 1))} ms); dirty-log persist waits ${dl.length} (p50 ${f2(quantile(dl, 0.5))}, max ${f2(quantile(dl, 1))} ms)`);
  }
  // QMP commands (the checkpoint's steps as each daemon ran them)
  console.log('\n  | QMP command | side | count | median ms | p99 ms | max ms |\n  |---|---|---|---|---|---|');
  for (const [side, t] of [['primary', primary], ['secondary', secondary]] as const) {
    const by = new Map<string, number[]>();
    for (const s of t.spans) {
      if (!s.name.startsWith('qmp ')) continue;
      let l = by.get(s.name);
      if (!l) by.set(s.name, (l = []));
      l.push(s.dur);
    }
    for (const [k, v] of by) if (v.length >= 20) console.log(`  | ${k.slice(4)} | ${side} | ${v.length} | ${f2(quantile(v, 0.5))} | ${f2(quantile(v, 0.99))} | ${f2(quantile(v, 1))} |`);
  }
  // the slowest holds and checkpoints: what overlapped them
  for (const [side, t, cmd] of [['primary', primary, 'qmp block-io-hold'], ['secondary', secondary, 'qmp xen-colo-do-checkpoint']] as const) {
    const xs = t.spans.filter((s) => s.name === cmd).sort((x, y) => y.dur - x.dur).slice(0, 5);
    for (const x of xs) {
      const lag = overlapping(t, (s) => s.name === 'loop.lag', x.start, x.start + x.dur).reduce((a, s) => a + s.dur, 0);
      const inner = t.spans.filter((s) => s.start >= x.start && s.start < x.start + x.dur && s.dur > 1 && !s.name.startsWith('nbd.') && !s.name.startsWith('w ') && s !== x)
        .map((s) => `${s.name} ${f2(s.dur)}`).slice(0, 6);
      console.log(`  slow ${cmd.slice(4)} on the ${side}: ${f2(x.dur)} ms; event-loop delay in it ${f2(lag)} ms; inside: ${inner.join(', ') || '-'}`);
    }
  }
}

function main(): void {
  const args = process.argv.slice(2);
  const dir = args[0];
  if (!dir) throw new Error('usage: pair-trace <trace dir> [--match S] [--slow-ms N]');
  const opt = (n: string) => {
    const i = args.indexOf(`--${n}`);
    return i < 0 ? undefined : args[i + 1];
  };
  const match = opt('match') ?? '';
  const slowMs = Number(opt('slow-ms') ?? 5);
  const pairs = new Map<string, Record<string, Trace>>();
  for (const f of readdirSync(dir)) {
    if (!f.startsWith('trace-')) continue;
    const t = load(join(dir, f));
    const r = roleOf(t.argv);
    if (!r || !r.dir.includes(match)) continue;
    let p = pairs.get(r.dir);
    if (!p) pairs.set(r.dir, (p = {}));
    p[r.role] = t;
  }
  for (const [d, p] of pairs) {
    if (!p.primary || !p.secondary) continue;
    console.log(`\n${basename(d)} (${basename(dirname(d))}):`);
    report(p.primary, p.secondary, slowMs);
  }
}

main();
