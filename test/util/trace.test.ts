// LOCKSTEP_TRACE: a process started with it writes its spans, event-loop delays and GC pauses
// to <dir>/trace-<pid>.tsv at exit; without it nothing is recorded or written.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from '../helpers/graph.js';

const traceModule = new URL('../../src/util/trace.js', import.meta.url).href;

// a child that times two steps of a "request" at offset 4096 and one without an offset,
// blocks its event loop for 30 ms, and exits
const script = `
const { span } = await import(${JSON.stringify(traceModule)});
const p = new Promise((r) => setTimeout(r, 20));
if (span('step.a', 4096, p) !== p) throw new Error('span must return its promise');
await p;
await span('step.b', -1, Promise.resolve());
await span('step.fails', 8192, Promise.reject(new Error('x'))).catch(() => {});
await new Promise((r) => setTimeout(r, 5));
const end = Date.now() + 30;
while (Date.now() < end) {}
await new Promise((r) => setTimeout(r, 10));
`;

function runChild(env: NodeJS.ProcessEnv, cwd?: string): number {
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { env, cwd, encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr);
  return r.pid!;
}

test('with LOCKSTEP_TRACE a process writes its spans and event-loop delays at exit, keyed by offset', (t) => {
  const dir = join(tempDir(t), 'traces');
  const before = Date.now();
  const pid = runChild({ ...process.env, LOCKSTEP_TRACE: dir });
  const lines = readFileSync(join(dir, `trace-${pid}.tsv`), 'utf8').trim().split('\n');
  assert.ok(lines[0]!.startsWith(`#\t${process.execPath}`), lines[0]); // the process's argv
  const rows = lines.slice(1).map((l) => l.split('\t'));
  const byName = (n: string) => rows.filter((r) => r[0] === n);
  const [a] = byName('step.a');
  assert.ok(a, 'step.a recorded');
  assert.equal(a[1], '4096');
  assert.ok(Number(a[3]) >= 15, `step.a lasted its timer: ${a[3]} ms`);
  assert.equal(byName('step.b')[0]?.[1], '-1');
  assert.equal(byName('step.fails')[0]?.[1], '8192', 'a rejected step is recorded too');
  // the 30 ms busy loop shows as an event-loop delay
  assert.ok(byName('loop.lag').some((r) => Number(r[3]) >= 20), JSON.stringify(byName('loop.lag')));
  // spans start on the wall clock (milliseconds since the epoch), so two processes' traces line up
  assert.ok(Number(a[2]) >= before - 5, `${a[2]} against ${before}`);
});

test('without LOCKSTEP_TRACE nothing is written', (t) => {
  const dir = tempDir(t);
  // (an empty value would name the working directory: the child runs in `dir`)
  runChild({ ...process.env, LOCKSTEP_TRACE: '' }, dir);
  assert.deepEqual(readdirSync(dir), []);
});
