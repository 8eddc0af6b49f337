// `lockstep pair outdate-peer`, run as an operator runs it on the node of a primary that went on
// alone, against the peer's real daemon (x-meta-read / x-meta-write): the peer's record is
// marked outdated by the primary's generation, a second run changes nothing, and a peer that is
// not at the generation the primary went on from, or a primary that never went on alone, is
// refused with its record left byte for byte as it was.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from '../helpers/graph.js';
import { LOCKSTEP_BIN, startLockstep } from '../helpers/processes.js';
import { inStep, justCreated, startGeneration, type DiskMeta } from '../../src/pair/generations.js';

const SIZE = 1 << 20;

function outdatePeer(dir: string, qmp: string, peerDir: string): { rc: number; out: string; err: string } {
  const r = spawnSync(process.execPath, [LOCKSTEP_BIN, 'pair', 'outdate-peer', '--dir', dir, '--qmp', qmp, '--peer-dir', peerDir], { encoding: 'utf8' });
  return { rc: r.status ?? -1, out: r.stdout, err: r.stderr };
}

test('pair outdate-peer marks the peer outdated through its daemon, once, and only the peer the primary left', async (t) => {
  const root = tempDir(t, 'outdate-peer-');
  const here = join(root, 'here');
  const peerDir = join(root, 'peer');
  for (const d of [here, peerDir]) mkdirSync(d, { recursive: true });
  const daemon = await startLockstep(peerDir, 'peer', []);
  t.after(() => daemon.kill());
  const qmp = join(peerDir, 'peer.qmp');

  const [p, s] = inStep(justCreated('primary.qcow2', SIZE, 'primary'), justCreated('secondary.qcow2', SIZE, 'secondary'), 'g1');
  const alone: DiskMeta = { ...startGeneration(p, 'g2', 'primary'), peerNotOutdated: 'g1' };
  const localPath = join(here, 'primary.qcow2.meta.json');
  const peerPath = join(peerDir, 'secondary.qcow2.meta.json');
  writeFileSync(localPath, JSON.stringify(alone));
  writeFileSync(peerPath, JSON.stringify(s));

  const r = outdatePeer(here, qmp, peerDir);
  assert.equal(r.rc, 0, r.err);
  assert.deepEqual(JSON.parse(r.out), { 'already-done': false, 'peer-generation': 'g1', outdated: 'g2' });
  const marked = JSON.parse(readFileSync(peerPath, 'utf8')) as DiskMeta;
  assert.equal(marked.outdated, 'g2');
  assert.equal(marked.current, 'g1', 'only the mark changes');
  assert.deepEqual(JSON.parse(readFileSync(localPath, 'utf8')), alone, 'the local record is only read');

  const again = outdatePeer(here, qmp, peerDir);
  assert.equal(again.rc, 0, again.err);
  assert.equal((JSON.parse(again.out) as { 'already-done': boolean })['already-done'], true);

  // a peer that went on too (it took over: a split brain for the generations) is not marked
  const tookOver = JSON.stringify(startGeneration(s, 'g3', 'primary'));
  writeFileSync(peerPath, tookOver);
  const other = outdatePeer(here, qmp, peerDir);
  assert.equal(other.rc, 1);
  assert.match(other.err, /^lockstep pair outdate-peer: the peer's disk is at generation g3, not g1 that this disk went on from: not marked/);
  assert.equal(readFileSync(peerPath, 'utf8'), tookOver);

  // a primary in step with its peer never went on alone: nothing to outdate
  writeFileSync(localPath, JSON.stringify(p));
  writeFileSync(peerPath, JSON.stringify(s));
  const inStepRun = outdatePeer(here, qmp, peerDir);
  assert.equal(inStepRun.rc, 1);
  assert.match(inStepRun.err, /has not gone on alone as a primary from a peer's generation: nothing to outdate/);
  assert.equal(readFileSync(peerPath, 'utf8'), JSON.stringify(s));
});
