// Generations: DRBD's ordered comparison rule by rule, and a seeded model of a pair's life
// (pairing, secondary lost, failover, writes on whichever side serves alone, restarts) in
// which every decision must copy only from a side that holds everything the other holds.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  compareGenerations,
  confirmedUpToDate,
  inStep,
  notCurrentReason,
  outdateBy,
  justCreated,
  parseMeta,
  startGeneration,
  type DiskMeta,
} from '../../src/pair/generations.js';

const SIZE = 1 << 20;
let seq = 0;
const id = (): string => `g${++seq}`;

function paired(): [DiskMeta, DiskMeta] {
  return inStep(justCreated('primary.qcow2', SIZE, 'primary'), justCreated('secondary.qcow2', SIZE, 'secondary'), id());
}

test('rules 1-3: just-created disks', () => {
  const p = justCreated('primary.qcow2', SIZE, 'primary');
  const s = justCreated('secondary.qcow2', SIZE, 'secondary');
  assert.equal(compareGenerations(p, s).kind, 'none');
  const [pp] = paired();
  assert.deepEqual(compareGenerations(pp, s), { kind: 'full', source: 'primary', targetIsZero: true, reason: 'the secondary disk is just created' });
  assert.deepEqual(compareGenerations(p, { ...pp, role: 'secondary' }), { kind: 'full', source: 'secondary', targetIsZero: true, reason: 'the primary disk is just created' });
});

test('rule 4: the same generation: the side that was primary is the source, an unfinished target never', () => {
  const [p, s] = paired();
  assert.equal(p.current, s.current);
  assert.deepEqual(compareGenerations(p, s).kind, 'incremental');
  assert.equal((compareGenerations(p, s) as { source: string }).source, 'primary');
  assert.equal((compareGenerations({ ...p, consistent: false }, s) as { source: string }).source, 'secondary');
  assert.equal(compareGenerations({ ...p, consistent: false }, { ...s, consistent: false }).kind, 'refuse');
});

test('rules 5 and 7: one side went on alone: incremental from it', () => {
  const [p, s] = paired();
  const survivor = startGeneration(s, id(), 'primary');
  assert.equal(survivor.bitmap, p.current);
  assert.deepEqual(compareGenerations(p, survivor).kind, 'incremental');
  assert.equal((compareGenerations(p, survivor) as { source: string }).source, 'secondary');
  const alone = startGeneration(p, id(), 'primary');
  assert.equal((compareGenerations(alone, s) as { source: string }).source, 'primary');
  // a second new generation while still alone keeps counting from the same point
  const again = startGeneration(alone, id(), 'primary');
  assert.equal(again.bitmap, p.current);
  assert.equal((compareGenerations(again, s) as { source: string }).source, 'primary');
});

test('rules 6 and 8: related only through history: full sync from the newer side', () => {
  const [p, s] = paired();
  // the secondary went on, was paired again with another disk, and went on again
  const s2 = startGeneration(startGeneration(s, id(), 'primary'), id(), 'primary');
  const s3 = { ...s2, bitmap: null, current: id(), history: [s2.current, ...s2.history] };
  const d = compareGenerations(p, s3);
  assert.equal(d.kind, 'full');
  assert.deepEqual([(d as { source: string }).source, (d as { targetIsZero: boolean }).targetIsZero], ['secondary', false]);
  const p3 = { ...p, bitmap: null, current: id(), history: [p.current, ...p.history] };
  assert.equal((compareGenerations(p3, s) as { source: string }).source, 'primary');
});

test('rules 9-11: split brain when both went on, unrelated disks refused', () => {
  const [p, s] = paired();
  const d = compareGenerations(startGeneration(p, id(), 'primary'), startGeneration(s, id(), 'primary'));
  assert.equal(d.kind, 'split-brain');
  assert.match(d.reason, new RegExp(`both disks changed since generation ${p.current}`));
  // histories intersect only further back
  const pa = { ...startGeneration(p, id(), 'primary'), bitmap: id() };
  const sa = { ...startGeneration(s, id(), 'primary'), bitmap: id() };
  assert.equal(compareGenerations(pa, sa).kind, 'split-brain');
  const [q] = paired();
  assert.equal(compareGenerations(q, s).kind, 'unrelated');
});

test('an inconsistent newer side is never a source; missing metadata is never guessed', () => {
  const [p, s] = paired();
  const survivor = { ...startGeneration(s, id(), 'primary'), consistent: false };
  const d = compareGenerations(p, survivor);
  assert.equal(d.kind, 'refuse');
  assert.match(d.reason, /the newer disk \(secondary\) is inconsistent/);
  assert.deepEqual(compareGenerations(null, s), { kind: 'no-metadata', sides: ['primary'], reason: 'no generation metadata on the primary disk: lockstep never guesses which disk is newer' });
  assert.deepEqual((compareGenerations(null, null) as { sides: string[] }).sides, ['primary', 'secondary']);
  assert.equal(compareGenerations(p, { ...s, size: SIZE * 2 }).kind, 'refuse');
});

test('UpToDate and Outdated: the secondary is current only while its record says so at its generation', () => {
  const [p, s] = paired();
  assert.equal(s.upToDate, s.current, 'in step after a sync: up to date');
  assert.equal(notCurrentReason(s), null);
  const cp = confirmedUpToDate(s, 7);
  assert.equal(cp.checkpoint, 7);
  assert.equal(notCurrentReason(cp), null);
  // a record of an older lockstep (no flag) is not taken for current
  const { upToDate: _u, ...old } = s;
  assert.match(notCurrentReason(old) ?? '', /does not say the disk was an up-to-date secondary/);
  assert.match(notCurrentReason({ ...s, consistent: false }) ?? '', /not consistent/);

  // the primary goes on alone, noting the peer; the peer is marked outdated from the note
  const alone = { ...startGeneration(p, id(), 'primary'), peerNotOutdated: s.current };
  assert.equal(alone.upToDate, alone.current);
  const outdated = outdateBy(s, alone.peerNotOutdated, alone.current);
  assert.ok(outdated);
  assert.equal(outdated.outdated, alone.current);
  assert.match(notCurrentReason(outdated) ?? '', /outdated: the primary went on alone/);
  // a peer that left the noted generation (it went on too, or was resynced) is not marked
  assert.equal(outdateBy({ ...s, current: id() }, s.current, alone.current), null);

  // the compare: the outdated disk is the target; found newer it is refused as a source
  assert.deepEqual(compareGenerations(alone, outdated), { kind: 'incremental', source: 'primary', reason: `the primary disk went on from the secondary's generation ${s.current}` });
  assert.equal(compareGenerations({ ...p, role: 'secondary' }, { ...outdated, role: 'primary' }).kind, 'refuse');
  // in step again: no mark, no note, up to date at the new generation
  const [a, b] = inStep(alone, outdated, alone.current);
  for (const m of [a, b]) {
    assert.equal(m.outdated, undefined);
    assert.equal(m.peerNotOutdated, undefined);
    assert.equal(m.upToDate, alone.current);
  }
  // a survivor's new generation drops an old mark and is up to date
  const survivor = startGeneration(outdated, id(), 'primary');
  assert.equal(survivor.outdated, undefined);
  assert.equal(survivor.upToDate, survivor.current);
  assert.throws(() => parseMeta({ ...s, outdated: 5 }, 'x.meta.json'), /not a lockstep pair metadata record/);
});

test('stored records are checked', () => {
  const [p] = paired();
  assert.deepEqual(parseMeta(JSON.parse(JSON.stringify(p)), 'x'), p);
  assert.equal(parseMeta(null, 'x'), null);
  assert.throws(() => parseMeta({ format: 'other' }, '/d/primary.meta.json'), /\/d\/primary.meta.json: not a lockstep pair metadata record/);
  assert.throws(() => parseMeta({ ...p, history: [1] }, 'f'), /not a lockstep pair metadata record/);
});

// ---- the model ------------------------------------------------------------------------

function prng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

interface ModelDisk {
  meta: DiskMeta;
  /** writes acknowledged as durable (made in step, or while serving alone) */
  writes: Set<number>;
}

test('a seeded model of 2000 lives: no decision copies a disk over one holding writes it lacks', () => {
  let splitBrains = 0;
  for (let seed = 1; seed <= 2000; seed++) {
    const r = prng(seed);
    const P: ModelDisk = { meta: justCreated('primary.qcow2', SIZE, 'primary'), writes: new Set() };
    const S: ModelDisk = { meta: justCreated('secondary.qcow2', SIZE, 'secondary'), writes: new Set() };
    let w = 0;
    let bothWentOn = false;
    let state: 'down' | 'paired' | 'p-alone' | 's-alone' | 'both-alone' = 'down';
    for (let step = 0; step < 12; step++) {
      const ev = r();
      if (state === 'down') {
        const d = compareGenerations(P.meta, S.meta);
        const sub = (a: Set<number>, b: Set<number>) => [...a].every((x) => b.has(x));
        if (d.kind === 'none') {
          assert.ok(sub(P.writes, S.writes) && sub(S.writes, P.writes), `seed ${seed}: no copy between different disks`);
        } else if (d.kind === 'incremental' || d.kind === 'full') {
          const [src, dst] = d.source === 'primary' ? [P, S] : [S, P];
          assert.ok(sub(dst.writes, src.writes), `seed ${seed}: ${d.kind} from ${d.source} would lose writes (${d.reason})`);
          dst.writes = new Set(src.writes);
        } else {
          assert.equal(d.kind, 'split-brain', `seed ${seed}: ${d.reason}`);
          assert.ok(bothWentOn, `seed ${seed}: split brain although one side stayed in the last generation`);
          splitBrains++;
          break;
        }
        assert.ok(!bothWentOn, `seed ${seed}: both went on alone, yet ${d.kind}`);
        [P.meta, S.meta] = inStep(P.meta, S.meta, id());
        state = 'paired';
      } else if (state === 'paired') {
        if (ev < 0.3) {
          const x = ++w;
          P.writes.add(x);
          S.writes.add(x);
        } else if (ev < 0.5) {
          P.meta = startGeneration(P.meta, id(), 'primary');
          state = 'p-alone';
        } else if (ev < 0.7) {
          S.meta = startGeneration(S.meta, id(), 'primary');
          state = 's-alone';
        } else if (ev < 0.8) {
          P.meta = startGeneration(P.meta, id(), 'primary');
          S.meta = startGeneration(S.meta, id(), 'primary');
          state = 'both-alone';
          bothWentOn = true;
        } else state = 'down';
      } else {
        if (ev < 0.6) {
          if (state !== 's-alone') P.writes.add(++w);
          if (state !== 'p-alone') S.writes.add(++w);
        } else state = 'down';
      }
    }
  }
  // the model reaches every kind of outcome, split brain included
  assert.ok(splitBrains > 0);
});

test('a resync mark rides in the target\'s record until the disks are in step again', () => {
  const [p, s] = paired();
  const marked: DiskMeta = { ...s, consistent: false, resync: { session: 'abc', source: p.current, pass: 2, 'done-up-to': 65536 } };
  // stored and read back as it is
  assert.deepEqual(parseMeta(JSON.parse(JSON.stringify(marked)), 'x'), marked);
  assert.throws(() => parseMeta({ ...marked, resync: { session: 'abc', pass: 2, 'done-up-to': 65536 } }, 'x'), /x: not a lockstep pair metadata record/);
  assert.throws(() => parseMeta({ ...marked, resync: { ...marked.resync, 'done-up-to': 1.5 } }, 'x'), /x: not a lockstep pair metadata record/);
  // the resync ends: both in step, no mark left on either
  const [a, b] = inStep(p, marked, p.current);
  assert.equal('resync' in a, false);
  assert.equal('resync' in b, false);
  assert.equal(b.consistent, true);
});
