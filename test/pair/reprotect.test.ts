// Re-protection while the primary serves (issue 13 item 4): a secondary lost under a write
// load is restarted by the supervisor, resynced live from the two change records while a
// client keeps writing, and the pair is protected again by itself; a later failover recovers
// exactly the disk at the last checkpoint. A primary that dies during the resync is not failed
// over to the half-copied disk.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { PairSupervisor, type PairOptions } from '../../src/pair/supervisor.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import { tempDir } from '../helpers/graph.js';
import { rng } from '../helpers/rng.js';
import { startDaemon } from '../helpers/daemon.js';
import { coalesceExtents, unionExtents, type ByteRange } from '../../src/pair/sync.js';
import { MERGE_GAP, clipExtents } from '../../src/pair/reprotect.js';
import type { DiskMeta } from '../../src/pair/generations.js';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;
/** the client's random writes stay in the first HOT bytes (as the bench confines them) */
const HOT = 4 * MiB;
const GRANULE = 65536;

function pair(dir: string, extra: Partial<PairOptions> = {}): PairSupervisor {
  return new PairSupervisor({
    // 256 KiB dirty-log extents: on a disk of a few MiB the pair's 4 MiB would make every
    // record after a crash name most of the disk, and the resync's bounds checked here vacuous
    dirtyExtentBytes: 256 * 1024,
    dataDir: dir,
    size: SIZE,
    checkpointIntervalMs: 0,
    heartbeatIntervalMs: 50,
    // liveness is not what these tests are about: a loaded machine must not fail a side over
    heartbeatTimeoutMs: 3000,
    failover: 'auto',
    nbdSocket: join(dir, 'disk.sock'),
    reprotectBackoffMs: 200,
    log: () => {},
    ...extra,
  });
}

const connect = (dir: string): Promise<NbdClient> => NbdClient.connect({ address: { type: 'unix', path: join(dir, 'disk.sock') }, exportName: 'disk' });
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const firstDiff = (a: Buffer, b: Buffer): number => a.findIndex((x, i) => x !== b[i]);

function killSecondary(sup: PairSupervisor): void {
  const c = sup.secondary?.child;
  if (!c) throw new Error('no secondary daemon started here');
  c.kill('SIGKILL');
}

/** Granule indexes of a byte range. */
function granules(offset: number, length: number): number[] {
  const out: number[] = [];
  for (let g = Math.floor(offset / GRANULE); g * GRANULE < offset + length; g++) out.push(g);
  return out;
}

const granulesOf = (extents: readonly ByteRange[]): Set<number> => new Set(extents.flatMap((e) => granules(e.offset, e.length)));

/**
 * One client writing a seeded sequence of patterns (one request at a time, so that the model
 * of acknowledged bytes is exact), noting each write's granules and the stage it was
 * acknowledged in.
 */
class Writer {
  readonly model = Buffer.alloc(SIZE);
  /** granules of each acknowledged write, in order */
  readonly log: Array<{ granules: number[]; stage: string }> = [];
  private running = false;
  private loop: Promise<void> | null = null;
  error: unknown = null;

  constructor(
    readonly client: NbdClient,
    private readonly sup: PairSupervisor,
    private readonly next: () => number,
  ) {}

  async write(offset: number, data: Buffer): Promise<void> {
    await this.client.write(offset, data);
    data.copy(this.model, offset);
    this.log.push({ granules: granules(offset, data.length), stage: this.sup.stage });
  }

  start(): void {
    this.running = true;
    this.loop = (async () => {
      let n = 0;
      while (this.running) {
        const len = 4096 * (1 + Math.floor(this.next() * 16));
        const offset = 512 * Math.floor((this.next() * (HOT - len)) / 512);
        await this.write(offset, Buffer.alloc(len, 1 + (n++ % 250)));
        // keep a few ms between writes so that the loaded machine still runs the resync
        await sleep(5);
      }
    })().catch((e: unknown) => {
      this.error = e;
    });
  }

  async stop(): Promise<void> {
    this.running = false;
    await this.loop;
    assert.equal(this.error, null, `the client's writes failed: ${String(this.error)}`);
  }
}

test('a secondary killed under a write load is restarted, resynced live and protected again; a failover then recovers the last checkpoint', { timeout: 180_000 }, async (t) => {
  const dir = tempDir(t);
  const logs: string[] = [];
  // a rate limit stretches the copy so that the client's writes overlap it; extents of one
  // granule (format 1), so that the killed secondary's record is exactly what it was sent and
  // the union can be checked granule by granule against the client's writes
  const sup = pair(dir, { resyncRate: 2 * MiB, dirtyExtentBytes: GRANULE, log: (level, msg) => logs.push(`${level}: ${msg}`) });
  t.after(() => sup.stop());
  await sup.start();
  const client = await connect(dir);
  t.after(() => client.disconnect().catch(() => {}));
  const w = new Writer(client, sup, rng(0x13a4));
  // a disk full of data, checkpointed, then idle long enough for both records to drop it
  for (let i = 0; i < SIZE / MiB; i++) await w.write(i * MiB, Buffer.alloc(MiB, 0x80 + i));
  await sup.checkpoint();
  await sleep(2500);
  const sinceCheckpoint = w.log.length;

  w.start();
  await sleep(300);
  const protectedAgain = new Promise<unknown>((r) => sup.once('protected', r));
  const degraded = new Promise((r) => sup.once('degraded', r));
  killSecondary(sup);
  await degraded;
  const atKill = w.log.length;
  await protectedAgain;
  assert.equal(sup.stage, 'protected');
  await sleep(300); // replicated writes after the re-protection
  await w.stop();

  assert.ok(logs.some((l) => /restarting the secondary daemon in \d+ ms/.test(l)), logs.join('\n'));
  const during = w.log.filter((x) => x.stage === 'resyncing').length;
  assert.ok(during > 0, 'the client wrote while the secondary was resynced');
  const r = sup.lastReprotect!;
  assert.ok(r.passes.length >= 1);

  // what the resync copied: within what the client wrote since the checkpoint (the union of
  // the two records), covering at least every write made before the secondary was lost, and
  // the job's counters add up to the bytes of each pass
  const written = new Set(w.log.slice(sinceCheckpoint).flatMap((x) => x.granules));
  const beforeKill = new Set(w.log.slice(sinceCheckpoint, atKill).flatMap((x) => x.granules));
  const union = granulesOf(r.union);
  for (const g of union) assert.ok(written.has(g), `the union names granule ${g}, which no client write touched since the checkpoint`);
  for (const g of beforeKill) assert.ok(union.has(g), `granule ${g} was written before the secondary was lost but is not in the union`);
  let copied = 0;
  for (const [i, pass] of r.passes.entries()) {
    // written granules, and gaps of at most MERGE_GAP between them: each range begins and
    // ends with a written granule, and no run of unwritten ones inside is longer
    for (const e of pass.extents) {
      const first = e.offset / GRANULE;
      const last = Math.ceil((e.offset + e.length) / GRANULE) - 1;
      assert.ok(written.has(first) && written.has(last), `pass ${i} copied ${JSON.stringify(e)}, which does not begin and end with a granule the client wrote`);
      let clean = 0;
      for (let g = first; g <= last; g++) {
        clean = written.has(g) ? 0 : clean + 1;
        assert.ok(clean * GRANULE <= MERGE_GAP, `pass ${i} copied ${clean} unwritten granules in a row up to ${g}: more than the merge gap`);
      }
    }
    assert.equal(pass.dataBytes + pass.zeroedBytes, pass.bytes, `pass ${i}: the job's counters`);
    assert.equal(pass.bytes, pass.extents.reduce((a, e) => a + e.length, 0), `pass ${i}: the bytes of its ranges`);
    copied += pass.bytes;
  }
  // pass 0 is the union with its gaps of at most MERGE_GAP filled (clean bytes, the same on
  // both disks); later passes only what the client wrote meanwhile (all in HOT)
  assert.deepEqual(r.passes[0]!.extents, coalesceExtents(r.union, MERGE_GAP));
  assert.ok(r.passes[0]!.bytes <= HOT + GRANULE, `an incremental resync: pass 0 copied ${r.passes[0]!.bytes} bytes of a ${SIZE}-byte disk`);
  assert.ok(copied > 0);
  const st = sup.status();
  assert.equal(st.disks?.secondary?.consistent, true);
  assert.equal(st.disks?.primary?.generation, st.disks?.secondary?.generation);
  assert.equal(st.resync, undefined);

  // the pair protects again: a checkpoint, then writes it does not cover, then the primary dies
  await sup.checkpoint();
  const atCheckpoint = Buffer.from(w.model);
  assert.equal(firstDiff(await client.read(0, SIZE), atCheckpoint), -1, 'the primary serves what the client wrote');
  for (let i = 0; i < 8; i++) await w.write(i * 2 * MiB + 4096, Buffer.alloc(8192, 0xee));
  await client.disconnect();
  const failedOver = new Promise((r) => sup.once('failed-over', r));
  sup.crashPrimary();
  await failedOver;
  const c2 = await connect(dir);
  const got = await c2.read(0, SIZE);
  await c2.disconnect();
  assert.equal(firstDiff(got, atCheckpoint), -1, 'the recovered disk is the primary\'s disk at the last checkpoint');
});

test('the primary killed during a resync: no failover to the inconsistent disk, and the status says why', { timeout: 120_000 }, async (t) => {
  const dir = tempDir(t);
  // slow enough that the primary dies in the middle; brought back by hand
  const sup = pair(dir, { resyncRate: MiB, reprotectBackoffMs: 600_000 });
  t.after(() => sup.stop());
  await sup.start();
  const client = await connect(dir);
  await client.write(0, Buffer.alloc(MiB, 0x11));
  await sup.checkpoint();
  const degraded = new Promise((r) => sup.once('degraded', r));
  killSecondary(sup);
  await degraded;
  await client.write(4 * MiB, Buffer.alloc(8 * MiB, 0x5a));
  await client.disconnect();

  const reprotect = sup.reprotect();
  reprotect.catch(() => {});
  for (let i = 0; i < 600 && !((sup.status().resync?.done ?? 0) > 0); i++) await sleep(50);
  assert.equal(sup.stage, 'resyncing');
  const seen = sup.status().resync!;
  assert.ok(seen.done > 0 && seen.done < seen.total, JSON.stringify(seen));
  assert.match(seen.reason, /the secondary's disk is inconsistent \(resync \d+% done\)/);
  // the record on disk says so too, for any later start
  const meta = JSON.parse(readFileSync(join(dir, 'secondary.qcow2.meta.json'), 'utf8')) as { consistent: boolean };
  assert.equal(meta.consistent, false);

  const lost = new Promise((r) => sup.once('primary-lost', r));
  sup.crashPrimary();
  await lost;
  await assert.rejects(reprotect);
  assert.equal(sup.stage, 'primary-lost');
  assert.match(sup.status()['last-error'] ?? '', /the primary died during a resync; no failover: the secondary's disk is inconsistent \(resync \d+% done\)/);
  await assert.rejects(sup.failover(), /no failover: the secondary's disk is inconsistent \(resync \d+% done\)/);
  assert.equal(sup.stage, 'primary-lost');
  assert.equal(sup.status().serving.length > 0 ? sup.status().role : 'none serving', 'none serving');
});

/** The two disk files hold the same guest bytes (qemu-img compare exits 0). */
function assertIdentical(a: string, b: string): void {
  const out = execFileSync('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', a, b], { encoding: 'utf8' });
  assert.match(out, /Images are identical/);
}

test('the secondary killed during its resync: no failover to it, back to degraded; brought back, the resync resumes above its flushed mark and copies only the rest; both disks end identical', { timeout: 120_000 }, async (t) => {
  const dir = tempDir(t);
  // slow, in pieces of 1 MiB: the secondary dies with part of the pass flushed and marked
  const sup = pair(dir, { resyncRate: MiB, resyncPieceBytes: MiB, reprotectBackoffMs: 600_000 });
  t.after(() => sup.stop());
  await sup.start();
  const client = await connect(dir);
  t.after(() => client.disconnect().catch(() => {}));
  await client.write(0, Buffer.alloc(MiB, 0x21));
  await sup.checkpoint();
  const degraded = new Promise((r) => sup.once('degraded', r));
  killSecondary(sup);
  await degraded;
  await client.write(2 * MiB, Buffer.alloc(6 * MiB, 0x22));

  const first = sup.reprotect();
  first.catch(() => {});
  const marked = (): boolean => {
    const m = sup.resyncMark?.mark;
    return m !== undefined && m.extents.length > 0 && m.doneUpTo > m.extents[0]!.offset;
  };
  for (let i = 0; i < 600 && !marked(); i++) await sleep(20);
  assert.equal(sup.stage, 'resyncing');
  await assert.rejects(sup.failover(), /no failover: the secondary's disk is inconsistent/);
  killSecondary(sup);
  await assert.rejects(first);
  for (let i = 0; i < 200 && (sup.stage as string) !== 'degraded'; i++) await sleep(50);
  assert.equal(sup.stage, 'degraded');
  await assert.rejects(sup.failover(), /the secondary is not running/);

  // the record beside the secondary's disk: inconsistent, with the mark of the pass it ran
  const metaFile = join(dir, 'secondary.qcow2.meta.json');
  const meta = JSON.parse(readFileSync(metaFile, 'utf8')) as DiskMeta;
  assert.equal(meta.consistent, false);
  const stood = sup.resyncMark!;
  assert.ok(meta.resync, 'no resync mark in the secondary disk\'s record');
  assert.equal(meta.resync.session, stood.session);
  assert.equal(meta.resync.pass, 0);
  assert.equal(meta.resync['done-up-to'], stood.mark.doneUpTo);
  const union = stood.mark.extents;
  const doneUpTo = meta.resync['done-up-to'];
  const last = union[union.length - 1]!;
  assert.ok(doneUpTo > union[0]!.offset && doneUpTo < last.offset + last.length, `mark ${doneUpTo} inside ${JSON.stringify(union)}`);
  // the regions written after the last checkpoint are what pass 0 copies
  for (const g of granules(2 * MiB, 6 * MiB)) assert.ok(granulesOf(union).has(g), `granule ${g} not in the union`);

  // the primary served all along
  await client.write(9 * MiB, Buffer.alloc(MiB, 0x23));
  await sup.reprotect();
  assert.equal(sup.stage, 'protected');
  // resumed: the rest of the pass above the mark and what was written since, nothing else
  const rest = unionExtents(clipExtents(union, doneUpTo), [{ offset: 9 * MiB, length: MiB }]);
  const r = sup.lastReprotect!;
  assert.deepEqual(r.union, rest);
  // the rest with its gaps of at most MERGE_GAP filled (here: none that small)
  assert.deepEqual(r.passes[0]!.extents, coalesceExtents(rest, MERGE_GAP));
  const restBytes = coalesceExtents(rest, MERGE_GAP).reduce((a, x) => a + x.length, 0);
  assert.equal(r.passes[0]!.bytes, restBytes);
  assert.equal(r.passes[0]!.dataBytes + r.passes[0]!.zeroedBytes, restBytes);
  const after = JSON.parse(readFileSync(metaFile, 'utf8')) as DiskMeta;
  assert.equal(after.consistent, true);
  assert.equal(after.resync, undefined);

  await client.write(11 * MiB, Buffer.alloc(MiB, 0x24)); // replicated
  await sup.checkpoint();
  const want = Buffer.alloc(SIZE);
  want.fill(0x21, 0, MiB);
  want.fill(0x22, 2 * MiB, 8 * MiB);
  want.fill(0x23, 9 * MiB, 10 * MiB);
  want.fill(0x24, 11 * MiB, 12 * MiB);
  assert.equal(firstDiff(await client.read(0, SIZE), want), -1);
  await client.disconnect();
  await sup.stop();
  assertIdentical(join(dir, 'primary.qcow2'), join(dir, 'secondary.qcow2'));
});

test('attached daemons (the two-host shape): the secondary\'s QMP address is retried until a fresh daemon answers there, then resynced and protected', { timeout: 120_000 }, async (t) => {
  const root = tempDir(t);
  const [dirA, dirB] = [join(root, 'a'), join(root, 'b')];
  mkdirSync(dirA);
  mkdirSync(dirB);
  const a = await startDaemon(t, dirA, []);
  const b1 = await startDaemon(t, dirB, []);
  const logs: string[] = [];
  const sup = pair(root, {
    primaryQmp: { type: 'unix', path: join(dirA, 'qmp.sock') },
    secondaryQmp: { type: 'unix', path: join(dirB, 'qmp.sock') },
    primaryDir: dirA,
    secondaryDir: dirB,
    nbdSocket: join(root, 'disk.sock'),
    log: (level, msg) => {
      logs.push(`${level}: ${msg}`);
      if (process.env.DEBUG_REPROTECT) console.error(new Date().toISOString(), level, msg);
    },
  });
  t.after(() => sup.stop());
  await sup.start();
  const client = await connect(root);
  t.after(() => client.disconnect().catch(() => {}));
  await client.write(0, Buffer.alloc(MiB, 0x31));
  await sup.checkpoint();
  const degraded = new Promise((r) => sup.once('degraded', r));
  b1.proc.kill('SIGKILL');
  await degraded;
  await client.write(3 * MiB, Buffer.alloc(2 * MiB, 0x32));
  // nothing answers at the address yet: the attempts fail and are retried
  for (let i = 0; i < 100 && !logs.some((l) => /re-protection failed: cannot reach the secondary daemon's QMP/.test(l)); i++) await sleep(50);
  assert.ok(logs.some((l) => /reaching the secondary daemon again in \d+ ms/.test(l)), logs.join('\n'));
  assert.ok(logs.some((l) => /re-protection failed: cannot reach the secondary daemon's QMP/.test(l)), logs.join('\n'));
  assert.equal(sup.stage, 'degraded');
  const protectedAgain = new Promise((r) => sup.once('protected', r));
  const b2 = await startDaemon(t, dirB, []); // `lockstep pair host` restarted on the secondary's host
  await protectedAgain;
  await client.write(6 * MiB, Buffer.alloc(MiB, 0x33)); // replicated
  await sup.checkpoint(); // the re-attached secondary checkpoints
  assert.equal(sup.stage, 'protected');
  const want = Buffer.alloc(SIZE);
  want.fill(0x31, 0, MiB);
  want.fill(0x32, 3 * MiB, 5 * MiB);
  want.fill(0x33, 6 * MiB, 7 * MiB);
  assert.equal(firstDiff(await client.read(0, SIZE), want), -1);
  assert.equal(sup.status().disks?.secondary?.consistent, true);
  await client.disconnect();
  await sup.stop();
  // attached daemons are the operator's: the supervisor leaves them running. (A SIGTERM to
  // the attached primary after this scenario did not end it within a minute: left for the
  // lead, see the report; a SIGKILL here.)
  a.proc.kill('SIGKILL');
  b2.proc.kill('SIGKILL');
});
