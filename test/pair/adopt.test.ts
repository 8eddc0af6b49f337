// What a restarted supervisor expects of each recorded daemon's graph, by the role it plays:
// once a failover's survivor was re-protected, the daemon started as secondary is the primary
// (its disk's nodes and the served quorum) and the one started as primary is its secondary.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PairAdoptError, expectedNodes, readDaemons, writeDaemons } from '../../src/pair/adopt.js';

test('the nodes each daemon must have, as started and with the roles swapped', () => {
  assert.deepEqual(expectedNodes('primary', 'protected'), ['local0', 'local0-log', 'colo-disk0']);
  assert.deepEqual(expectedNodes('secondary', 'protected'), ['secondary-disk0', 'parent0', 'childs0']);
  assert.deepEqual(expectedNodes('secondary', 'protected', 'secondary'), ['secondary-disk0', 'parent0', 'childs0', 'colo-disk0']);
  assert.deepEqual(expectedNodes('primary', 'protected', 'secondary'), ['local0', 'local0-log', 'childs0']);
  // nothing served yet: any layout (the daemons are retired, not adopted)
  assert.deepEqual(expectedNodes('primary', 'syncing', 'secondary'), []);
});

test('the daemons record keeps which side plays the primary, and refuses a bad value', (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'lockstep-adopt-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const entry = { pid: 4242, qmp: join(dir, 'secondary.qmp'), log: join(dir, 'secondary-daemon.log') };
  writeDaemons(dir, { stage: 'protected', primary: null, secondary: entry, 'primary-side': 'secondary', generation: { primary: null, secondary: null }, serving: [] });
  assert.equal(readDaemons(dir)?.['primary-side'], 'secondary');
  writeDaemons(dir, { stage: 'protected', primary: null, secondary: entry, generation: { primary: null, secondary: null }, serving: [] });
  assert.equal(readDaemons(dir)?.['primary-side'], undefined);
  const r = readDaemons(dir)!;
  writeFileSync(join(dir, 'pair-daemons.json'), JSON.stringify({ ...r, 'primary-side': 'both' }));
  assert.throws(() => readDaemons(dir), PairAdoptError);
});
