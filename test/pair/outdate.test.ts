// Outdating the peer. The supervisor (both daemons on this host): the checkpoint writes the
// secondary's record up to date; a secondary that stops answering (SIGSTOP) has its record,
// on this host, marked outdated by the primary's new generation at once (no note left); the
// resync (from the primary) that brings it back ends in step with the mark gone. (A peer on
// another host that cannot be reached: test/ocf/outdate.test.ts.) `lockstep pair outdate-peer`, run as an operator runs it on the node of a
// primary that went on alone, against the peer's real daemon (x-meta-read / x-meta-write): the
// peer's record is marked outdated by the primary's generation, a second run changes nothing,
// and a peer that is not at the generation the primary went on from, or a primary that never
// went on alone, is refused with its record left byte for byte as it was.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from '../helpers/graph.js';
import { LOCKSTEP_BIN, startLockstep } from '../helpers/processes.js';
import { inStep, justCreated, startGeneration, type DiskMeta } from '../../src/pair/generations.js';
import { PairSupervisor } from '../../src/pair/supervisor.js';
import { NbdClient } from '../../src/nbd/client/client.js';

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

test('the supervisor marks a lost secondary outdated as the primary goes on alone, then resyncs it from the primary', { timeout: 120_000 }, async (t) => {
  const dir = tempDir(t, 'outdate-sup-');
  const logs: string[] = [];
  const sup = new PairSupervisor({
    dataDir: dir,
    size: 4 << 20,
    checkpointIntervalMs: 0,
    heartbeatIntervalMs: 50,
    heartbeatTimeoutMs: 300,
    heartbeatLostMs: 1500,
    failover: 'manual',
    nbdSocket: join(dir, 'disk.sock'),
    reprotectBackoffMs: 200,
    log: (_level, msg) => logs.push(msg),
  });
  const events: string[] = [];
  for (const e of ['degraded', 'protected']) sup.on(e, () => events.push(e));
  t.after(() => sup.stop());
  await sup.start();
  const c = await NbdClient.connect({ address: { type: 'unix', path: join(dir, 'disk.sock') }, exportName: 'disk' });
  t.after(() => c.disconnect().catch(() => {}));
  await c.write(0, Buffer.alloc(65536, 0x31));
  await sup.checkpoint();
  const secPath = join(dir, 'secondary.qcow2.meta.json');
  const priPath = join(dir, 'primary.qcow2.meta.json');
  const read = (p: string) => JSON.parse(readFileSync(p, 'utf8')) as DiskMeta;
  const atCheckpoint = read(secPath);
  assert.equal(atCheckpoint.upToDate, atCheckpoint.current);
  assert.equal(atCheckpoint.checkpoint, 1);

  const child = sup.secondary!.child!;
  child.kill('SIGSTOP');
  await new Promise<void>((r) => sup.once('degraded', () => r()));
  const alone = read(priPath);
  assert.equal(alone.bitmap, atCheckpoint.current, 'the primary went on from the pair generation');
  assert.equal(alone.peerNotOutdated, undefined, 'the record on this host was marked: no note');
  const outdated = read(secPath);
  assert.equal(outdated.outdated, alone.current);
  assert.equal(outdated.current, atCheckpoint.current);
  await c.write(65536, Buffer.alloc(65536, 0x32));
  await c.flush();
  child.kill('SIGCONT');

  await new Promise<void>((r) => sup.once('protected', () => r()));
  assert.ok(logs.some((m) => m.startsWith("marked the secondary's disk outdated")), logs.join('\n'));
  const s = read(secPath);
  const p = read(priPath);
  assert.equal(s.current, p.current, 'in step again');
  assert.equal(s.outdated, undefined);
  assert.equal(p.peerNotOutdated, undefined);
  assert.equal(s.upToDate, s.current);
  assert.deepEqual(events, ['degraded', 'protected']);

  // the resynced secondary holds the write the primary made alone: a failover serves it
  await sup.checkpoint();
  await c.disconnect();
  await sup.failover();
  const after = await NbdClient.connect({ address: { type: 'unix', path: join(dir, 'disk.sock') }, exportName: 'disk' });
  t.after(() => after.disconnect().catch(() => {}));
  assert.deepEqual(await after.read(0, 131072), Buffer.concat([Buffer.alloc(65536, 0x31), Buffer.alloc(65536, 0x32)]));
});
