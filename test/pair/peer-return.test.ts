// The wait for a failed side's daemon after a failover across two hosts (peer-return.ts):
// attempts back off, the log says each new reason once, the status says what is awaited and
// since when, and the first answer hands over to the re-protection exactly once.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { PeerReturnWatch } from '../../src/pair/peer-return.js';
import { tempDir } from '../helpers/graph.js';
import { startDaemon } from '../helpers/daemon.js';

async function until<T>(what: string, fn: () => T | undefined, timeoutMs = 30_000): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = fn();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

test("the failed side's daemon awaited: quiet retries, the wait in the status, one hand-over when it answers", { timeout: 60_000 }, async (t) => {
  const dir = tempDir(t);
  const path = join(dir, 'qmp.sock');
  const lines: Array<{ level: string; msg: string }> = [];
  let answered = 0;
  let handOver!: () => void;
  const handedOver = new Promise<void>((r) => (handOver = r));
  const watch = new PeerReturnWatch({
    side: 'primary',
    address: { type: 'unix', path },
    tls: undefined,
    firstDelayMs: 20,
    timeoutMs: 2000,
    log: (level, msg) => lines.push({ level, msg }),
    onAnswer: async () => {
      answered++;
      handOver();
    },
  });
  t.after(() => watch.stop());
  const before = Date.now();
  watch.start();
  assert.match(lines[0]!.msg, new RegExp(`^waiting for the primary daemon at ${path} to answer again`));
  const st = await until('three failed attempts', () => {
    const s = watch.status();
    return s.attempts >= 3 ? s : undefined;
  });
  assert.equal(st.side, 'primary');
  assert.equal(st.address, path);
  assert.ok(Date.parse(st.since) >= before - 1000 && Date.parse(st.since) <= Date.now());
  assert.match(st['last-error'] ?? '', /ENOENT/);
  // the same reason each time: said once
  assert.equal(lines.filter((l) => /does not answer yet/.test(l.msg)).length, 1, JSON.stringify(lines));

  // the daemon comes up at that address: the next attempt hands over, once
  await startDaemon(t, dir, []);
  await handedOver;
  assert.equal(answered, 1);
  assert.equal(lines.filter((l) => /the primary daemon answers again: re-protecting/.test(l.msg)).length, 1);
  assert.equal(watch.status()['next-attempt-ms'], undefined, 'no attempt is scheduled after the answer');
});

test('a stopped wait never hands over', { timeout: 30_000 }, async (t) => {
  const dir = tempDir(t);
  const daemon = await startDaemon(t, dir, []);
  let answered = 0;
  const watch = new PeerReturnWatch({
    side: 'secondary',
    address: { type: 'unix', path: daemon.qmpPath },
    tls: undefined,
    firstDelayMs: 50,
    timeoutMs: 2000,
    log: () => {},
    onAnswer: async () => {
      answered++;
    },
  });
  watch.start();
  watch.stop();
  // an answer would come after the first delay; give it several
  await new Promise((r) => setTimeout(r, 500));
  assert.equal(answered, 0);
  assert.equal(watch.status().attempts, 0);
});
