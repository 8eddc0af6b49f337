// x-query-event-loop-delay against `./bin/lockstep daemon`: the delay fields as before, and
// turn-cpu, the CPU time of the daemon's loop thread between two 1 ms ticks.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { tempDir } from '../helpers/graph.js';
import { startDaemon } from '../helpers/daemon.js';

type Report = Record<string, unknown> & { samples: number; since: string; 'turn-cpu'?: Record<string, number> };

test('x-query-event-loop-delay reports the loop thread CPU per tick beside the delay; reset starts a new measurement', async (t) => {
  const d = await startDaemon(t, tempDir(t), []);
  const c = await d.client();
  await new Promise((r) => setTimeout(r, 100));
  const first = (await c.execute('x-query-event-loop-delay', { reset: true })) as Report;
  for (const k of ['resolution-ms', 'since', 'samples', 'mean-ms', 'p50-ms', 'p99-ms', 'p999-ms', 'max-ms']) assert.ok(k in first, k);
  const cpu = first['turn-cpu'];
  assert.ok(cpu, `turn-cpu missing: ${String(first['turn-cpu-unavailable'])}`);
  assert.deepEqual(Object.keys(cpu), ['samples', 'mean-ms', 'p50-ms', 'p99-ms', 'p999-ms', 'max-ms']);
  assert.ok(cpu.samples! > 0 && first.samples > 0);
  assert.ok(cpu['p50-ms']! <= cpu['p99-ms']! && cpu['p99-ms']! <= cpu['max-ms']!, JSON.stringify(cpu));

  const second = (await c.execute('x-query-event-loop-delay')) as Report;
  assert.ok(second.since > first.since, 'a new measurement since the reset');
  assert.ok(second['turn-cpu'], 'still measured after the reset');
});
