// The daemon's loop figures (src/util/loop-delay.ts): beside the event-loop delay, the CPU time
// the loop's thread consumed between two ticks of a 1 ms timer (`turn-cpu`), which waiting for
// a CPU does not inflate. Needs the native helper (npm ci builds it); without it the report
// says why instead.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { LoopDelayMonitor } from '../../src/util/loop-delay.js';
import { threadCpuClock, threadCpuUnavailableReason } from '../../src/util/native.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const MODULE = new URL('../../src/util/loop-delay.js', import.meta.url).href;

/** Spins until the thread has consumed `ms` of CPU (not wall) time. */
function burnCpu(clock: () => number, ms: number): void {
  const end = clock() + ms * 1e6;
  while (clock() < end) {
    // one turn that holds the loop, as a long piece of work does
  }
}

test('the thread CPU clock counts what this thread ran, not time spent asleep', async () => {
  const clock = threadCpuClock();
  assert.ok(clock, `no thread CPU clock: ${threadCpuUnavailableReason()}`);
  const before = clock();
  await sleep(50);
  const asleep = clock() - before;
  burnCpu(clock, 20);
  const after = clock() - before;
  assert.ok(after >= 20e6, `20 ms of work shows as ${after / 1e6} ms`);
  assert.ok(asleep < after, 'sleeping counted less than working');
});

test('one turn of 40 ms of CPU shows as the turn-cpu max; the other ticks of the interval show little', async () => {
  const clock = threadCpuClock();
  assert.ok(clock, `no thread CPU clock: ${threadCpuUnavailableReason()}`);
  const m = new LoopDelayMonitor();
  try {
    await sleep(20);
    m.reset();
    await sleep(20);
    burnCpu(clock, 40);
    await sleep(30);
    const r = m.report();
    const cpu = r['turn-cpu'];
    assert.ok(cpu, `turn-cpu missing: ${r['turn-cpu-unavailable']}`);
    assert.equal(r['turn-cpu-unavailable'], undefined);
    assert.ok(cpu.samples >= 2, `${cpu.samples} ticks`);
    // the interval that held the busy turn consumed at least its 40 ms
    assert.ok(cpu['max-ms'] >= 40, `max ${cpu['max-ms']} ms`);
    // and it is one interval of many: the median tick is an idle one
    assert.ok(cpu['p50-ms'] < cpu['max-ms'], `p50 ${cpu['p50-ms']} ms, max ${cpu['max-ms']} ms`);
    // the delay fields are there as before
    assert.ok(r['max-ms'] >= 40, `loop delay max ${r['max-ms']} ms`);

    m.reset();
    const empty = m.report()['turn-cpu']!;
    assert.ok(empty['max-ms'] < 40, `reset emptied the histogram (max ${empty['max-ms']} ms)`);
  } finally {
    m.close();
  }
});

test('an idle process consumes almost no CPU between ticks', () => {
  // a process of its own: this one runs the test runner beside the monitor
  const script = `
    const { LoopDelayMonitor } = await import(${JSON.stringify(MODULE)});
    const m = new LoopDelayMonitor();
    await new Promise((r) => setTimeout(r, 50));
    m.reset();
    await new Promise((r) => setTimeout(r, 300));
    process.stdout.write(JSON.stringify(m.report()));
    m.close();`;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8', timeout: 30_000 });
  assert.equal(r.status, 0, r.stderr);
  const cpu = (JSON.parse(r.stdout) as ReturnType<LoopDelayMonitor['report']>)['turn-cpu'];
  assert.ok(cpu, r.stdout);
  assert.ok(cpu.samples > 10, `${cpu.samples} ticks in 300 ms`);
  // CPU time, not wall time: however loaded the machine, an idle loop runs microseconds a tick
  assert.ok(cpu['max-ms'] < 10, `idle max ${cpu['max-ms']} ms`);
});

test('a turn blocked without running (as a preempted one) shows in the delay, not in turn-cpu', async () => {
  const m = new LoopDelayMonitor();
  try {
    await sleep(20);
    m.reset();
    await sleep(20);
    // the thread sleeps 40 ms inside one turn: the loop is held, the CPU is not used
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 40);
    await sleep(30);
    const r = m.report();
    assert.ok(r['max-ms'] >= 40, `loop delay max ${r['max-ms']} ms`);
    assert.ok(r['turn-cpu']!['max-ms'] < 40, `turn-cpu max ${r['turn-cpu']!['max-ms']} ms`);
  } finally {
    m.close();
  }
});

test('without the native helper the report says the CPU figure is unavailable and keeps the delay', () => {
  const script = `
    const { LoopDelayMonitor } = await import(${JSON.stringify(MODULE)});
    const m = new LoopDelayMonitor();
    await new Promise((r) => setTimeout(r, 30));
    process.stdout.write(JSON.stringify(m.report()));
    m.close();`;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], {
    encoding: 'utf8',
    timeout: 30_000,
    env: { ...process.env, LOCKSTEP_NATIVE: 'off' },
  });
  assert.equal(r.status, 0, r.stderr);
  const report = JSON.parse(r.stdout) as Record<string, unknown>;
  assert.equal(report['turn-cpu'], undefined);
  assert.equal(report['turn-cpu-unavailable'], 'the native helper is disabled by LOCKSTEP_NATIVE=off');
  assert.ok((report.samples as number) > 0, 'the delay is still measured');
  for (const k of ['resolution-ms', 'since', 'samples', 'mean-ms', 'p50-ms', 'p99-ms', 'p999-ms', 'max-ms']) assert.ok(k in report, k);
});
