import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Pacer } from '../../src/util/pacer.js';

function busy(ms: number): void {
  const end = performance.now() + ms;
  while (performance.now() < end) {
    // hold the loop, as a long piece of work does
  }
}

test('a pacer lets work go on in a young turn and gives the loop a turn once the budget is spent', async () => {
  const p = new Pacer(2);
  await p.yieldTurn(); // a fresh turn
  assert.equal(p.pace(), undefined);
  busy(3);
  let timerRan = false;
  setTimeout(() => (timerRan = true), 0);
  busy(2); // the timer is due now
  const waited = p.pace();
  assert.ok(waited instanceof Promise);
  // two callers in the same spent turn share one resume
  const second = p.pace();
  assert.ok(second instanceof Promise);
  await Promise.all([waited, second]);
  assert.equal(timerRan, true, 'the due timer ran before the work resumed');
  assert.equal(p.yields, 3);
  assert.equal(p.pace(), undefined, 'the resume starts a new turn');
});
