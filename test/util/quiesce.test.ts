import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Quiesce } from '../../src/util/quiesce.js';

/** Lets every promise callback queued so far run (a few turns of the microtask queue and one macrotask). */
const settle = (): Promise<void> => new Promise((r) => setImmediate(r));

test('a hold waits for the activities in flight, and new ones wait for its release', async () => {
  const q = new Quiesce();
  const order: string[] = [];
  q.start();
  q.start();
  const holding = q.hold().then((release) => {
    order.push('held');
    return release;
  });
  const later = q.enter().then(() => order.push('entered'));
  await settle();
  assert.deepEqual(order, []);
  assert.equal(q.held, true);
  q.leave();
  await settle();
  assert.deepEqual(order, [], 'one activity still in flight');
  q.leave();
  const release = await holding;
  await settle();
  assert.deepEqual(order, ['held']);
  assert.equal(q.inFlight, 0);
  release();
  await later;
  assert.deepEqual(order, ['held', 'entered']);
  assert.equal(q.inFlight, 1);
  assert.equal(q.held, false);
});

test('holds nest: activities wait for the last release; a release twice counts once', async () => {
  const q = new Quiesce();
  const r1 = await q.hold();
  const r2 = await q.hold();
  let entered = false;
  const later = q.enter().then(() => (entered = true));
  r1();
  r1();
  await settle();
  assert.equal(entered, false);
  assert.equal(q.held, true);
  r2();
  await later;
  assert.equal(entered, true);
});

test('an activity woken by a release checks again for a hold taken meanwhile', async () => {
  const q = new Quiesce();
  const r1 = await q.hold();
  let entered = false;
  const later = q.enter().then(() => (entered = true));
  r1();
  // a second holder comes in the same turn as the release, before the woken activity runs
  const r2 = await q.hold();
  await settle();
  assert.equal(entered, false);
  r2();
  await later;
  assert.equal(entered, true);
});

test('holding() releases when its function throws; drain() resolves at once when idle', async () => {
  const q = new Quiesce();
  await assert.rejects(
    q.holding(() => {
      throw new Error('boom');
    }),
    /boom/,
  );
  assert.equal(q.held, false);
  await q.drain();
  assert.throws(() => q.leave(), /without an activity in flight/);
});
