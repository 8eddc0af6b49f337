// The pair's stage table: every stage reaches stopped, failover only from stages that hold a
// checkpoint to fail over to, and the machine refuses what the table does not list.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { STAGE_POLICY, STAGE_TRANSITIONS, StageMachine, canTransition, type PairStage } from '../../src/pair/stages.js';

const ALL = Object.keys(STAGE_TRANSITIONS) as PairStage[];

test('every stage but stopped can stop, and stopped is final', () => {
  for (const s of ALL) if (s !== 'stopped') assert.ok(canTransition(s, 'stopped'), s);
  assert.deepEqual(STAGE_TRANSITIONS.stopped, []);
});

test('failed-over is reached only from stages whose policy allows a failover', () => {
  for (const s of ALL) assert.equal(canTransition(s, 'failed-over'), STAGE_POLICY[s].failover, s);
});

test('the machine follows the table and refuses a jump', () => {
  const m = new StageMachine();
  const seen: string[] = [];
  const w = new StageMachine('starting', (a, b) => seen.push(`${a}>${b}`));
  w.to('syncing');
  w.to('protected');
  w.to('degraded');
  assert.deepEqual(seen, ['starting>syncing', 'syncing>protected', 'protected>degraded']);
  assert.throws(() => m.to('protected'), /cannot go from starting to protected/);
  assert.equal(m.tryTo('failed-over'), false);
  assert.equal(m.stage, 'starting');
  assert.equal(m.policy.checkpoints, false);
});
