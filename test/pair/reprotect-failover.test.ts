// Re-protection after a failover (issue 13 item 4): the survivor becomes the primary. Writes
// the primary made after the last checkpoint (A, and A2 that never reached the secondary
// because the forwarding was cut) are discarded by the failover; the survivor
// serves and takes writes (B) over one NBD connection that stays open throughout; `reprotect`
// brings the old primary's disk back as the secondary, resyncs exactly the union of the two
// change records while the survivor serves, and replication runs in the new direction. More
// writes (C) over the same connection, a checkpoint, writes after it (D), then the new primary
// is SIGKILLed: failing over back recovers the new primary's disk at that checkpoint, byte for
// byte (B and C there, A and D gone).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { PairSupervisor } from '../../src/pair/supervisor.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import { readDirtyLogFile } from '../../src/block/filters/dirty-log.js';
import { unionExtents, type ByteRange } from '../../src/pair/sync.js';
import type { DiskMeta } from '../../src/pair/generations.js';
import { tempDir } from '../helpers/graph.js';

const MiB = 1024 * 1024;
const KiB = 1024;
const SIZE = 16 * MiB;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const firstDiff = (a: Buffer, b: Buffer): number => a.findIndex((x, i) => x !== b[i]);
const bytesOf = (e: readonly ByteRange[]): number => e.reduce((a, r) => a + r.length, 0);
/** every byte of [offset, offset+length) lies in `extents` */
const covers = (extents: readonly ByteRange[], offset: number, length: number): boolean =>
  bytesOf(unionExtents(extents, [{ offset, length }])) === bytesOf(extents);

/** A client that keeps the bytes it had acknowledged, to compare the served disk against. */
class Client {
  readonly model = Buffer.alloc(SIZE);
  constructor(readonly nbd: NbdClient) {}
  async write(offset: number, length: number, fill: number): Promise<void> {
    const data = Buffer.alloc(length, fill);
    await this.nbd.write(offset, data);
    data.copy(this.model, offset);
  }
}

test('after a failover the survivor becomes the primary: the old primary\'s disk is resynced from the union of both records, and failing back recovers the new primary\'s checkpoint', { timeout: 180_000 }, async (t) => {
  const dir = tempDir(t);
  const sock = join(dir, 'disk.sock');
  const sup = new PairSupervisor({
    // 256 KiB dirty-log extents: on a disk of a few MiB the pair's 4 MiB would make every
    // record after a crash name most of the disk, and the resync's bounds checked here vacuous
    dirtyExtentBytes: 256 * 1024,
    dataDir: dir,
    size: SIZE,
    checkpointIntervalMs: 0,
    heartbeatIntervalMs: 50,
    // liveness is not what this test is about: a loaded machine must not fail a side over
    heartbeatTimeoutMs: 3000,
    failover: 'auto',
    nbdSocket: sock,
    // a failed attempt would be retried at once; the test drives re-protection itself
    reprotectBackoffMs: 600_000,
    log: () => {},
  });
  t.after(() => sup.stop());
  await sup.start();
  const first = new Client(await NbdClient.connect({ address: { type: 'unix', path: sock }, exportName: 'disk' }));
  // the checkpointed data, then idle long enough for both records to drop it
  await first.write(0, 4 * MiB, 0x11);
  await sup.checkpoint();
  await sleep(2500);
  const atFirstCheckpoint = Buffer.from(first.model);
  // A: after the checkpoint, over checkpointed data and fresh space; discarded by the failover
  const A = [
    { offset: 0, length: 256 * KiB },
    { offset: 4 * MiB, length: 2 * MiB },
  ];
  for (const a of A) await first.write(a.offset, a.length, 0x22);
  // A2: written once the forwarding is cut, so the secondary never sees them and the
  // failover's commit does not touch them: only the old primary's record names them
  await sup.call(sup.secondary!, 'block-export-del', { id: 'parent0', mode: 'hard' });
  const A2 = { offset: 2 * MiB, length: 256 * KiB };
  await first.write(A2.offset, A2.length, 0x66);
  await first.nbd.disconnect().catch(() => {});
  const failedOver = new Promise((r) => sup.once('failed-over', r));
  sup.crashPrimary();
  await failedOver;
  assert.equal(sup.stage, 'failed-over');
  const survivor = sup.secondary!;
  assert.equal(survivor.name, 'secondary');

  // B on the survivor, over a connection that stays open until the end
  const client = new Client(await NbdClient.connect({ address: { type: 'unix', path: sock }, exportName: 'disk' }));
  t.after(() => client.nbd.disconnect().catch(() => {}));
  atFirstCheckpoint.copy(client.model);
  assert.equal(firstDiff(await client.nbd.read(0, SIZE), atFirstCheckpoint), -1, 'the survivor serves the disk at the first checkpoint (A discarded)');
  const B = [
    { offset: 5 * MiB, length: 512 * KiB }, // inside A's region: both records name it
    { offset: 8 * MiB, length: 2 * MiB },
  ];
  for (const b of B) await client.write(b.offset, b.length, 0x33);

  // both change records as they stand: the old primary's in its log file (its daemon is
  // dead), the survivor's from its running dirty log
  const oldRecord = (await readDirtyLogFile(join(dir, 'primary.qcow2.dirty'))).extents;
  const survivorRecord = ((await sup.call(survivor, 'x-dirty-log-query', { 'node-name': 'parent0' })) as { extents: ByteRange[] }).extents;
  for (const a of [...A, A2]) assert.ok(covers(oldRecord, a.offset, a.length), `the old primary's record names A at ${a.offset}`);
  assert.ok(!covers(survivorRecord, A2.offset, 4096), "the survivor's record does not name A2");
  for (const b of B) assert.ok(covers(survivorRecord, b.offset, b.length), `the survivor's record names B at ${b.offset}`);
  const union = unionExtents(oldRecord, survivorRecord);

  const protectedAgain = new Promise((r) => sup.once('protected', r));
  await sup.reprotect();
  await protectedAgain;
  assert.equal(sup.stage, 'protected');
  // roles swapped: the survivor's daemon (started as secondary) is the primary
  assert.equal(sup.primary, survivor);
  assert.equal(sup.secondary?.name, 'primary');
  assert.ok(sup.secondary.alive);

  // the resync copied exactly the union of both records, no more, in one pass (no writes ran)
  const r = sup.lastReprotect!;
  assert.deepEqual(r.union, union);
  assert.equal(r.passes[0]!.bytes, bytesOf(union), "pass 0's job copied the union's bytes");
  // data, zeroes, or nothing where the target reads zeroes already (A's writes into fresh
  // clusters may not have reached primary.qcow2's metadata before the SIGKILL)
  assert.equal(r.passes[0]!.dataBytes + r.passes[0]!.zeroedBytes + r.passes[0]!.skippedZeroBytes, r.passes[0]!.bytes, "the job's counters");
  assert.ok(r.passes[0]!.dataBytes >= B.reduce((a, b) => a + b.length, 0), "B's bytes went as data");
  const copied = r.passes.reduce((a, p) => a + p.bytes, 0) + r.barrierBytes;
  assert.equal(copied, bytesOf(union), 'nothing but the union was copied');
  assert.ok(bytesOf(union) < SIZE / 2, `an incremental resync: ${bytesOf(union)} bytes of a ${SIZE}-byte disk`);

  // status, generations and the adoption record say the roles are swapped
  const st = sup.status();
  assert.equal(st['primary-side'], 'secondary');
  assert.equal(st.sides?.secondary.role, 'Primary');
  assert.equal(st.sides?.primary.role, 'Secondary');
  assert.equal(st.disks?.primary?.generation, st.disks?.secondary?.generation);
  assert.equal(st.disks?.primary?.consistent, true);
  const meta = (n: string) => JSON.parse(readFileSync(join(dir, `${n}.qcow2.meta.json`), 'utf8')) as DiskMeta;
  assert.equal(meta('secondary').role, 'primary');
  assert.equal(meta('primary').role, 'secondary');
  assert.equal(meta('primary').current, meta('secondary').current);
  assert.equal(meta('primary').consistent, true);
  const daemons = JSON.parse(readFileSync(join(dir, 'pair-daemons.json'), 'utf8')) as { stage: string; 'primary-side'?: string; primary: { pid: number } | null; secondary: { pid: number } | null };
  assert.equal(daemons.stage, 'protected');
  assert.equal(daemons['primary-side'], 'secondary');
  assert.equal(daemons.primary?.pid, sup.secondary.child?.pid);
  assert.equal(daemons.secondary?.pid, survivor.child?.pid);

  // C over the same connection, replicated; a checkpoint in the new direction; D after it
  const C = [
    { offset: 1 * MiB, length: 256 * KiB },
    { offset: 12 * MiB, length: MiB },
  ];
  for (const c of C) await client.write(c.offset, c.length, 0x44);
  await sup.checkpoint();
  const atCheckpoint = Buffer.from(client.model);
  assert.equal(firstDiff(await client.nbd.read(0, SIZE), atCheckpoint), -1, 'the new primary serves every acknowledged write on the connection opened before re-protection');
  await client.write(9 * MiB, 256 * KiB, 0x55);
  await client.write(14 * MiB, 256 * KiB, 0x55);

  // the new primary dies: the old primary's disk, its secondary now, is recovered and served
  const failedBack = new Promise((r) => sup.once('failed-over', r));
  sup.crashPrimary();
  await failedBack;
  assert.equal(sup.secondary?.name, 'primary');
  const back = await NbdClient.connect({ address: { type: 'unix', path: sock }, exportName: 'disk' });
  const got = await back.read(0, SIZE);
  await back.disconnect();
  assert.equal(firstDiff(got, atCheckpoint), -1, "the recovered disk is the new primary's disk at its last checkpoint");
  // spelled out: B and C there, A and the writes after the checkpoint gone
  assert.equal(got[5 * MiB], 0x33);
  assert.equal(got[12 * MiB], 0x44);
  assert.equal(got[4 * MiB], 0);
  assert.equal(got[0], 0x11);
  assert.equal(got[A2.offset], 0x11);
  assert.equal(got[9 * MiB], 0x33);
  assert.equal(got[14 * MiB], 0);
});

test('after a failover, a returning disk whose generations say split brain: stage split-brain, nothing is copied, the survivor keeps serving; resolve --keep the survivor saves the other disk and resyncs it live', { timeout: 120_000 }, async (t) => {
  const dir = tempDir(t);
  const sock = join(dir, 'disk.sock');
  const sup = new PairSupervisor({
    // 256 KiB dirty-log extents: on a disk of a few MiB the pair's 4 MiB would make every
    // record after a crash name most of the disk, and the resync's bounds checked here vacuous
    dirtyExtentBytes: 256 * 1024,
    dataDir: dir,
    size: SIZE,
    checkpointIntervalMs: 0,
    heartbeatIntervalMs: 50,
    heartbeatTimeoutMs: 3000,
    failover: 'auto',
    nbdSocket: sock,
    reprotectBackoffMs: 600_000,
    log: () => {},
  });
  t.after(() => sup.stop());
  await sup.start();
  const first = await NbdClient.connect({ address: { type: 'unix', path: sock }, exportName: 'disk' });
  await first.write(0, Buffer.alloc(MiB, 0x11));
  await sup.checkpoint();
  await first.disconnect();
  const failedOver = new Promise((r) => sup.once('failed-over', r));
  sup.crashPrimary();
  await failedOver;
  const client = new Client(await NbdClient.connect({ address: { type: 'unix', path: sock }, exportName: 'disk' }));
  t.after(() => client.nbd.disconnect().catch(() => {}));
  client.model.fill(0x11, 0, MiB);
  await client.write(2 * MiB, MiB, 0x33);

  // the old primary's record says it went on from the same common generation as the survivor
  // (as after an unfenced failover whose old primary kept writing): both changed since
  const metaFile = join(dir, 'primary.qcow2.meta.json');
  const survivorMeta = JSON.parse(readFileSync(join(dir, 'secondary.qcow2.meta.json'), 'utf8')) as DiskMeta;
  const old = JSON.parse(readFileSync(metaFile, 'utf8')) as DiskMeta;
  assert.ok(survivorMeta.bitmap, 'the survivor counts its changes since a generation');
  writeFileSync(metaFile, JSON.stringify({ ...old, current: 'feedfacefeedface', bitmap: survivorMeta.bitmap }));
  const diskBefore = readFileSync(join(dir, 'primary.qcow2'));

  await assert.rejects(sup.reprotect(), (e: Error & { code?: string }) => e.code === 'ESPLITBRAIN' && /split brain/.test(e.message));
  assert.equal(sup.stage, 'split-brain', 'nothing copied, the returning disk not taken on');
  assert.match(sup.status()['last-error'] ?? '', /split brain: .*the secondary daemon serves on/);
  assert.ok(readFileSync(join(dir, 'primary.qcow2')).equals(diskBefore), "the old primary's disk is unchanged");
  const st = sup.status();
  // the survivor serves on, as a DRBD primary that finds a split brain on connect
  assert.deepEqual(st.serving, [`nbd+unix:///disk?socket=${sock}`]);
  assert.equal(st.role, 'secondary serving');
  assert.equal(st.sides?.secondary.role, 'Primary');
  // what each side changed: the survivor's dirty log holds its MiB of 0x33
  assert.ok((st['split-brain']?.['changed-bytes'].secondary ?? 0) >= MiB, JSON.stringify(st['split-brain']));
  assert.equal(st.sides?.secondary['changed-bytes'], st['split-brain']?.['changed-bytes'].secondary);
  // the same connection writes and reads on
  await client.write(4 * MiB, MiB, 0x44);
  assert.equal(firstDiff(await client.nbd.read(0, SIZE), client.model), -1);

  // keep the survivor's disk: the other one is saved whole first, then resynced live
  const res = await sup.resolve('secondary');
  assert.equal(res.saved.side, 'primary');
  assert.equal(sup.stage, 'protected');
  assert.equal(sup.status()['primary-side'], 'secondary');
  assert.ok(res.copied && res.copied.bytes >= 2 * MiB, JSON.stringify(res.copied));
  assert.equal(firstDiff(await client.nbd.read(0, SIZE), client.model), -1);
  // a failover back serves the survivor's bytes at the checkpoint from the old primary's disk
  await sup.checkpoint();
  const failedBack = new Promise((r) => sup.once('failed-over', r));
  await client.nbd.disconnect();
  sup.crashPrimary();
  await failedBack;
  const back = await NbdClient.connect({ address: { type: 'unix', path: sock }, exportName: 'disk' });
  try {
    assert.equal(firstDiff(await back.read(0, SIZE), client.model), -1);
  } finally {
    await back.disconnect();
  }
});
