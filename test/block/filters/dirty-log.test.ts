// The dirty-log filter in one process: what reaches the log file and when, group commit of
// first touches, lazy clearing after checkpoints, mark/clear, reopening, and bad input.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync, truncateSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { newGraph, pattern, tempDir } from '../../helpers/graph.js';
import { getDirtyLog, readDirtyLogFile, decodeLog, recordOf, DIRTY_LOG_HEADER_SIZE } from '../../../src/block/filters/dirty-log.js';
import type { BlockGraph } from '../../../src/block/graph.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const G = 64 * KiB;

async function openLog(g: BlockGraph, log: string, extra: Record<string, unknown> = {}, size = 4 * MiB) {
  if (!g.lookup('disk')) await g.open({ driver: 'memory', size, 'node-name': 'disk' }, { monitorOwned: true });
  return g.open({ driver: 'dirty-log', 'node-name': 'dl', file: 'disk', filename: log, ...extra }, { monitorOwned: true });
}

async function until(what: string, cond: () => boolean | Promise<boolean>): Promise<void> {
  for (let i = 0; i < 400; i++) {
    if (await cond()) return;
    await new Promise((r) => setTimeout(r, 25));
  }
  assert.fail(`timed out waiting for ${what}`);
}

test('a write is in the log file before it reaches the disk, and a persisted granule costs no I/O', async (t) => {
  const dir = tempDir(t);
  const g = newGraph();
  t.after(() => g.closeAll());
  const logPath = join(dir, 'disk.dlog');
  const node = await openLog(g, logPath);
  const log = getDirtyLog(node);
  assert.deepEqual(await readDirtyLogFile(logPath), { granularity: G, 'dirty-bytes': 0, extents: [] });
  assert.equal(readFileSync(logPath).length, DIRTY_LOG_HEADER_SIZE + 8); // 64 granules: 8 bytes

  // the disk below refuses to take the write until we have looked at the log file
  const disk = g.getNode('disk');
  const realWrite = disk.impl.write!.bind(disk.impl);
  let seenAtWrite: unknown = null;
  disk.impl.write = async (offset, data, flags) => {
    seenAtWrite = (await readDirtyLogFile(logPath)).extents;
    return realWrite(offset, data, flags);
  };
  await node.write(G + 100, pattern(0x11, G)); // granules 1 and 2
  assert.deepEqual(seenAtWrite, [{ offset: G, length: 2 * G }]);
  disk.impl.write = realWrite;

  const syncs = log.syncs;
  await node.write(G + 5, pattern(0x22, 10));
  await node.writeZeroes(2 * G, 512);
  assert.equal(log.syncs, syncs, 'granules already persisted need no sync');

  // fifty first touches issued together share one persist
  await Promise.all(Array.from({ length: 50 }, (_, i) => node.write((10 + i) * G, pattern(i, 512))));
  assert.equal(log.syncs, syncs + 1);
  await node.discard(63 * G, G);
  assert.deepEqual(log.report(), {
    granularity: G,
    'dirty-bytes': 53 * G,
    extents: [
      { offset: G, length: 2 * G },
      { offset: 10 * G, length: 50 * G },
      { offset: 63 * G, length: G },
    ],
  });
  assert.deepEqual(await readDirtyLogFile(logPath), log.report());
  assert.deepEqual(node.impl.info?.(), { 'dirty-log': logPath, granularity: G, 'dirty-bytes': 53 * G });
});

test('checkpoints drop confirmed granules lazily, at most one rewrite per interval, never a later write', async (t) => {
  const dir = tempDir(t);
  const g = newGraph();
  t.after(() => g.closeAll());
  const logPath = join(dir, 'disk.dlog');
  const node = await openLog(g, logPath, { 'clear-interval-ms': 200 });
  const log = getDirtyLog(node);
  await node.write(0, pattern(1, 10)); // granule 0: confirmed by the checkpoints below
  const started = performance.now();
  // 40 checkpoints, each after a write into granule 5 (written after every call but the last)
  for (let i = 0; i < 40; i++) {
    await node.write(5 * G, pattern(i, 10));
    log.checkpoint();
  }
  await node.write(7 * G, pattern(9, 10)); // after the last checkpoint: must stay
  const elapsed = performance.now() - started;
  assert.ok(log.rewrites <= Math.floor(elapsed / 200) + 1, `${log.rewrites} rewrites in ${elapsed} ms`);
  // in memory and in the file, granule 0 and 5 go (lazily); 7 stays
  await until('the confirmed granules to be dropped', async () => (await readDirtyLogFile(logPath)).extents.length === 1);
  assert.deepEqual((await readDirtyLogFile(logPath)).extents, [{ offset: 7 * G, length: G }]);
  assert.deepEqual(log.report().extents, [{ offset: 7 * G, length: G }]);
  const rewrites = log.rewrites;
  // a dropped granule written again is persisted again (into the rewritten file)
  await node.write(0, pattern(3, 1));
  assert.deepEqual((await readDirtyLogFile(logPath)).extents, [
    { offset: 0, length: G },
    { offset: 7 * G, length: G },
  ]);
  // without a checkpoint nothing is ever dropped (a rewrite already scheduled may still land
  // on a loaded machine; what matters is that it drops nothing)
  await new Promise((r) => setTimeout(r, 500));
  assert.ok(log.rewrites <= rewrites + 1, `${log.rewrites - rewrites} rewrites without a checkpoint`);
  assert.deepEqual((await readDirtyLogFile(logPath)).extents, [
    { offset: 0, length: G },
    { offset: 7 * G, length: G },
  ]);
  assert.deepEqual(log.report().extents, [
    { offset: 0, length: G },
    { offset: 7 * G, length: G },
  ]);
});

test('mark and clear persist before they return; a reopened log keeps its record', async (t) => {
  const dir = tempDir(t);
  const g = newGraph();
  t.after(() => g.closeAll());
  const logPath = join(dir, 'disk.dlog');
  const node = await openLog(g, logPath, { granularity: 4096 });
  const log = getDirtyLog(node);
  await log.markExtents([
    { offset: 4096 * 3 + 1, length: 4096 },
    { offset: 0, length: 1 },
  ]);
  assert.deepEqual((await readDirtyLogFile(logPath)).extents, [
    { offset: 0, length: 4096 },
    { offset: 3 * 4096, length: 2 * 4096 },
  ]);
  await log.clear();
  assert.deepEqual(await readDirtyLogFile(logPath), { granularity: 4096, 'dirty-bytes': 0, extents: [] });
  await node.write(MiB, pattern(7, 3 * 4096));
  await g.closeAll();

  // reopened: the record is loaded, granularity taken from the file
  const g2 = newGraph();
  t.after(() => g2.closeAll());
  const again = await openLog(g2, logPath);
  const l2 = getDirtyLog(again);
  assert.deepEqual(l2.report(), { granularity: 4096, 'dirty-bytes': 3 * 4096, extents: [{ offset: MiB, length: 3 * 4096 }] });
  // what was loaded is unconfirmed: a checkpoint is needed before it may go
  assert.equal(l2.granularity, 4096);
});

test('dirty-log option and file errors name what is wrong', async (t) => {
  const dir = tempDir(t);
  const g = newGraph();
  t.after(() => g.closeAll());
  await g.open({ driver: 'memory', size: 4 * MiB, 'node-name': 'disk' }, { monitorOwned: true });
  await g.open({ driver: 'memory', size: 8 * MiB, 'node-name': 'big' }, { monitorOwned: true });
  const logPath = join(dir, 'disk.dlog');
  const open = (extra: Record<string, unknown>) => g.open({ driver: 'dirty-log', file: 'disk', filename: logPath, ...extra });
  await assert.rejects(g.open({ driver: 'dirty-log', file: 'disk' }), { message: "Parameter 'filename' is missing" });
  await assert.rejects(open({ granularity: 3000 }), { message: "Parameter 'granularity' must be a power of 2, not 3000" });
  await assert.rejects(open({ granularity: 256 }), { message: "Parameter 'granularity' expects a value in range [512B, 1GB], not 256" });
  await assert.rejects(open({ bogus: 1 }), { message: "Parameter 'bogus' is unexpected" });
  const n = await open({ 'node-name': 'dl' });
  await n.write(0, pattern(1, 1));
  await g.closeAll();

  const g2 = newGraph();
  t.after(() => g2.closeAll());
  await g2.open({ driver: 'memory', size: 8 * MiB, 'node-name': 'big' }, { monitorOwned: true });
  await g2.open({ driver: 'memory', size: 4 * MiB, 'node-name': 'disk' }, { monitorOwned: true });
  await assert.rejects(g2.open({ driver: 'dirty-log', file: 'big', filename: logPath }), {
    message: `Dirty log '${logPath}' is for a disk of ${4 * MiB} bytes, but the node has ${8 * MiB} bytes`,
  });
  await assert.rejects(g2.open({ driver: 'dirty-log', file: 'disk', filename: logPath, granularity: 4096 }), {
    message: `Dirty log '${logPath}' has granularity 65536, not 4096`,
  });
  const before = readFileSync(logPath);
  truncateSync(logPath, DIRTY_LOG_HEADER_SIZE + 3);
  await assert.rejects(g2.open({ driver: 'dirty-log', file: 'disk', filename: logPath }), {
    message: `'${logPath}' is not a valid dirty log: ${DIRTY_LOG_HEADER_SIZE + 3} bytes, expected ${DIRTY_LOG_HEADER_SIZE + 8} for a ${4 * MiB}-byte disk`,
  });
  writeFileSync(logPath, Buffer.concat([Buffer.from('NOTALOG!'), before.subarray(8)]));
  await assert.rejects(readDirtyLogFile(logPath), { message: `'${logPath}' is not a valid dirty log: bad magic` });
  await assert.rejects(readDirtyLogFile(join(dir, 'none')), (e: Error) => e.message.startsWith(`Cannot read dirty log '${join(dir, 'none')}': ENOENT`));
  await assert.rejects(g2.open({ driver: 'dirty-log', file: 'disk', filename: join(dir, 'no-dir', 'x.dlog') }), (e: Error) =>
    e.message.startsWith(`Cannot create dirty log '${join(dir, 'no-dir', 'x.dlog')}'`),
  );
});

test('hot-bytes: a record within the budget is kept whole after checkpoints; over it, confirmed granules go', async (t) => {
  const dir = tempDir(t);
  const g = newGraph();
  t.after(() => g.closeAll());
  const logPath = join(dir, 'disk.dlog');
  const node = await openLog(g, logPath, { 'clear-interval-ms': 20, 'hot-bytes': 3 * G });
  const log = getDirtyLog(node);
  await node.write(0, pattern(1, 2 * G)); // granules 0, 1: within the budget of 3
  log.checkpoint();
  await new Promise((r) => setTimeout(r, 300));
  log.checkpoint();
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual((await readDirtyLogFile(logPath)).extents, [{ offset: 0, length: 2 * G }]);
  assert.equal(log.rewrites, 0);
  await node.write(4 * G, pattern(2, 3 * G)); // 4, 5, 6: five granules, over the budget
  log.checkpoint();
  await node.write(9 * G, pattern(3, 1));
  await until('the confirmed granules to be dropped', async () => (await readDirtyLogFile(logPath)).extents.length === 1);
  assert.deepEqual((await readDirtyLogFile(logPath)).extents, [{ offset: 9 * G, length: G }]);
  // clear drops everything, whatever the budget
  await log.clear();
  assert.deepEqual((await readDirtyLogFile(logPath)).extents, []);
});

test('extent-size: the extent is in the file before a first write reaches the disk; granule bits reach it at close', async (t) => {
  const dir = tempDir(t);
  const g = newGraph();
  t.after(() => g.closeAll());
  const logPath = join(dir, 'disk.dlog');
  const node = await openLog(g, logPath, { 'extent-size': MiB });
  const log = getDirtyLog(node);
  // format 2: header, 64 granule bits on their own page, then 4 extent bits
  const file = readFileSync(logPath);
  assert.equal(file.readUInt32LE(8), 2);
  assert.equal(file.readUInt32LE(28), MiB);
  assert.equal(file.length, 2 * DIRTY_LOG_HEADER_SIZE + 1);

  const disk = g.getNode('disk');
  const realWrite = disk.impl.write!.bind(disk.impl);
  let seenAtWrite: unknown = null;
  disk.impl.write = async (offset, data, flags) => {
    seenAtWrite = (await readDirtyLogFile(logPath)).extents;
    return realWrite(offset, data, flags);
  };
  await node.write(G + 100, pattern(0x11, G)); // granules 1 and 2, in extent 0
  assert.deepEqual(seenAtWrite, [{ offset: 0, length: MiB }]);
  disk.impl.write = realWrite;

  // another first write into a persisted extent: no I/O; a new extent: one persist
  const syncs = log.syncs;
  await node.write(5 * G, pattern(0x22, 10));
  assert.equal(log.syncs, syncs);
  await node.writeZeroes(2 * MiB + 3 * G, 512);
  assert.equal(log.syncs, syncs + 1);
  const exact = {
    granularity: G,
    'dirty-bytes': 4 * G,
    extents: [
      { offset: G, length: 2 * G },
      { offset: 5 * G, length: G },
      { offset: 2 * MiB + 3 * G, length: G },
    ],
  };
  // in memory the record is exact; the file is the superset a crash would leave
  assert.deepEqual(log.report(), exact);
  assert.deepEqual((await readDirtyLogFile(logPath)).extents, [
    { offset: 0, length: MiB },
    { offset: 2 * MiB, length: MiB },
  ]);
  assert.deepEqual(node.impl.info?.(), { 'dirty-log': logPath, granularity: G, 'extent-size': MiB, 'dirty-bytes': 4 * G });
  await g.closeAll();
  // a clean close writes the granule bits and drops the extents
  assert.deepEqual(await readDirtyLogFile(logPath), exact);

  // reopened without the option: format 2 and its extent size come from the file
  const g2 = newGraph();
  t.after(() => g2.closeAll());
  const l2 = getDirtyLog(await openLog(g2, logPath));
  assert.equal(l2.extentSize, MiB);
  assert.deepEqual(l2.report(), exact);
});

test('extent-size: rewrites after checkpoints write the granule bits and keep only extents written since the last one', async (t) => {
  const dir = tempDir(t);
  const g = newGraph();
  t.after(() => g.closeAll());
  const logPath = join(dir, 'disk.dlog');
  const node = await openLog(g, logPath, { 'extent-size': MiB, 'clear-interval-ms': 20 });
  const log = getDirtyLog(node);
  await node.write(0, pattern(1, 10)); // granule 0, extent 0
  await node.write(2 * MiB, pattern(2, 10)); // granule 32, extent 2
  log.checkpoint();
  await node.write(3 * G, pattern(3, 10)); // granule 3, after the checkpoint: must stay
  // the first rewrite keeps extents 0 and 2 (written since the last rewrite), the next one
  // drops them: the file is then the exact record
  const after = [{ offset: 3 * G, length: G }];
  await until('the extents to be dropped', async () => (await readDirtyLogFile(logPath)).extents.length === 1);
  assert.deepEqual((await readDirtyLogFile(logPath)).extents, after);
  assert.deepEqual(log.report().extents, after);
  assert.ok(log.rewrites >= 2);
  // a dropped extent is persisted again before the next write into it goes on
  const syncs = log.syncs;
  await node.write(2 * MiB + G, pattern(4, 10));
  assert.equal(log.syncs, syncs + 1);
  assert.deepEqual((await readDirtyLogFile(logPath)).extents, [
    { offset: 3 * G, length: G },
    { offset: 2 * MiB, length: MiB },
  ]);
  // clear drops granules and extents at once
  await log.clear();
  assert.deepEqual(await readDirtyLogFile(logPath), { granularity: G, 'dirty-bytes': 0, extents: [] });
});

test('extent-size: a checkpoint while a rewrite waits for its flush starts no second rewrite at once, which would drop the extents written meanwhile', async (t) => {
  const dir = tempDir(t);
  const g = newGraph();
  t.after(() => g.closeAll());
  const logPath = join(dir, 'disk.dlog');
  const node = await openLog(g, logPath, { 'extent-size': MiB, 'clear-interval-ms': 2000 });
  const log = getDirtyLog(node);
  // the first rewrite after a checkpoint runs at once only once an interval has passed since
  // the process started (the log has never been rewritten)
  await until('an interval since the start', () => performance.now() > 2100);
  for (let e = 0; e < 4; e++) await node.write(e * MiB, pattern(e, 10));
  // the disk's flush (the rewrite makes the data durable first) waits until we let it go
  const disk = g.getNode('disk');
  let letGo!: () => void;
  const gate = new Promise<void>((r) => (letGo = r));
  let flushing = false;
  disk.impl.flush = async () => {
    flushing = true;
    await gate;
  };
  log.checkpoint();
  await until('the rewrite to flush the disk', () => flushing);
  // a checkpoint and writes into extents 1 and 2 while that flush is slow (a loaded disk)
  log.checkpoint();
  await node.write(1 * MiB + G, pattern(5, 10));
  await node.write(2 * MiB + G, pattern(6, 10));
  letGo();
  await until('the rewrite', () => log.rewrites >= 1);
  // extents 1 and 2 were written since the last rewrite: still persisted, no new sync
  const syncs = log.syncs;
  await node.write(1 * MiB + 2 * G, pattern(7, 10));
  await node.write(2 * MiB + 2 * G, pattern(8, 10));
  assert.equal(log.rewrites, 1);
  assert.equal(log.syncs, syncs);
});

test('a format 1 log opened with extent-size is rewritten as format 2 with its record; bad extent sizes and files are refused', async (t) => {
  const dir = tempDir(t);
  const g = newGraph();
  t.after(() => g.closeAll());
  const logPath = join(dir, 'disk.dlog');
  const n = await openLog(g, logPath);
  await n.write(G, pattern(1, 2 * G));
  await g.closeAll();
  const v1 = readFileSync(logPath);
  assert.equal(v1.readUInt32LE(8), 1);
  const record = [{ offset: G, length: 2 * G }];

  const g2 = newGraph();
  t.after(() => g2.closeAll());
  const l2 = getDirtyLog(await openLog(g2, logPath, { 'extent-size': 2 * MiB }));
  assert.deepEqual(l2.report().extents, record);
  assert.equal(readFileSync(logPath).readUInt32LE(8), 2);
  assert.deepEqual((await readDirtyLogFile(logPath)).extents, record);
  await g2.closeAll();

  const g3 = newGraph();
  t.after(() => g3.closeAll());
  await g3.open({ driver: 'memory', size: 4 * MiB, 'node-name': 'disk' }, { monitorOwned: true });
  const open = (extra: Record<string, unknown>) => g3.open({ driver: 'dirty-log', file: 'disk', filename: join(dir, 'new.dlog'), ...extra });
  const msg = (e: number) => `Parameter 'extent-size' must be a power of 2 in range [granularity (${G}), 1GB], not ${e}`;
  await assert.rejects(open({ 'extent-size': 3 * MiB }), { message: msg(3 * MiB) });
  await assert.rejects(open({ 'extent-size': 4096 }), { message: msg(4096) });
  await assert.rejects(open({ 'extent-size': 2 * 1024 * MiB }), { message: msg(2 * 1024 * MiB) });
  // format 2 back to format 1 (extent-size equal to the granularity): the record stays
  const l3 = getDirtyLog(await g3.open({ driver: 'dirty-log', 'node-name': 'dl', file: 'disk', filename: logPath, 'extent-size': G }));
  assert.deepEqual(l3.report().extents, record);
  assert.equal(readFileSync(logPath).readUInt32LE(8), 1);
  await g3.closeAll();

  // files this build cannot read are refused with what is wrong
  const v2 = Buffer.from(v1);
  v2.writeUInt32LE(3, 8);
  writeFileSync(logPath, v2);
  await assert.rejects(readDirtyLogFile(logPath), { message: `'${logPath}' is not a valid dirty log: format version 3 (this build reads 1 and 2)` });
  v2.writeUInt32LE(2, 8);
  v2.writeUInt32LE(G, 28);
  writeFileSync(logPath, v2);
  await assert.rejects(readDirtyLogFile(logPath), { message: `'${logPath}' is not a valid dirty log: extent size ${G} with granularity ${G}` });
  v2.writeUInt32LE(MiB, 28);
  writeFileSync(logPath, v2);
  await assert.rejects(readDirtyLogFile(logPath), {
    message: `'${logPath}' is not a valid dirty log: ${v2.length} bytes, expected ${2 * DIRTY_LOG_HEADER_SIZE + 1} for a ${4 * MiB}-byte disk`,
  });
});

test('extent-size: an extent first marked while a rewrite runs is in the log file before any write into it reaches the disk', async (t) => {
  const dir = tempDir(t);
  const g = newGraph();
  t.after(() => g.closeAll());
  const logPath = join(dir, 'disk.dlog');
  const node = await openLog(g, logPath, { 'extent-size': MiB });
  const log = getDirtyLog(node);
  await node.write(0, pattern(1, 10));
  // at the instant each write reaches the disk, the file (read synchronously) must cover it
  const disk = g.getNode('disk');
  const realWrite = disk.impl.write!.bind(disk.impl);
  const uncovered: number[] = [];
  disk.impl.write = (offset, data, flags) => {
    const record = recordOf(decodeLog(logPath, readFileSync(logPath)));
    if (!record.get(Math.floor(offset / G))) uncovered.push(offset);
    return realWrite(offset, data, flags);
  };
  // the first write into extent 2 comes while the rewrite writes its new file (already
  // encoded, without extent 2), and log I/O is slow (a loaded disk)
  const probe = await open(logPath, 'r');
  const proto = Object.getPrototypeOf(probe) as { write: (...a: unknown[]) => Promise<unknown> };
  await probe.close();
  const realFileWrite = proto.write;
  let during: (() => void) | null = null;
  proto.write = async function (this: unknown, ...a: unknown[]) {
    const hook = during;
    during = null;
    hook?.();
    await new Promise((r) => setTimeout(r, 5));
    return realFileWrite.apply(this, a);
  };
  t.after(() => {
    proto.write = realFileWrite;
  });
  for (let round = 0; round < 5; round++) {
    let first: Promise<void> | null = null;
    during = () => {
      first = node.write(2 * MiB + round * 4096, pattern(2, 10));
    };
    await log.clear();
    assert.ok(first, 'the rewrite wrote its file');
    // right after the rewrite: extent 2 is only about to be persisted
    await Promise.all([first, node.write(2 * MiB + G + round * 4096, pattern(3, 10))]);
  }
  assert.deepEqual(uncovered, []);
});
