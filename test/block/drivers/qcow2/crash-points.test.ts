// Crash at every point of a metadata update: the image is driven through Qcow2Image over a
// host file that stops writing (as a killed process would) after its k-th write, for every
// k. Each such file must pass qemu-img check without corruption (leaks are fine), for a
// writeback of many dirty tables with frees, for make_empty's fast path and for growing
// the image (L1 table move). make_empty's swap path must leave the old image byte for byte
// or the new empty one.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { newGraph, tempDir } from '../../../helpers/graph.js';
import { createQcow2 } from '../../../../src/block/drivers/qcow2/create.js';
import { readHeader } from '../../../../src/block/drivers/qcow2/header.js';
import { FsHostFile, type HostFile, type PreparedReplacement } from '../../../../src/block/drivers/qcow2/host-file.js';
import { Qcow2Image } from '../../../../src/block/drivers/qcow2/image.js';
import { discardRange, writeRange, zeroRange } from '../../../../src/block/drivers/qcow2/io.js';
import { EmptySpare, makeEmpty } from '../../../../src/block/drivers/qcow2/make-empty.js';
import { needTools, qemuCheck } from './tools.js';

class Crashed extends Error {}

/** Passes the first `budget` writes/truncates through, then "dies": nothing more is written. */
class DyingFile implements HostFile {
  writes = 0;
  constructor(
    private readonly inner: FsHostFile,
    private readonly budget: number,
  ) {}
  read(offset: number, length: number): Promise<Buffer> {
    return this.inner.read(offset, length);
  }
  async write(offset: number, data: Buffer): Promise<void> {
    if (this.writes++ >= this.budget) throw new Crashed('crashed');
    await this.inner.write(offset, data);
  }
  flush(): Promise<void> {
    return this.inner.flush();
  }
  length(): number {
    return this.inner.length();
  }
  async truncate(length: number): Promise<void> {
    if (this.writes++ >= this.budget) throw new Crashed('crashed');
    await this.inner.truncate(length);
  }
}

/**
 * Runs `scenario` on a copy of `image` for budgets 0, 1, 2, ... until it completes
 * without crashing; checks every crashed copy. Returns the number of crash points.
 */
async function everyCrashPoint(dir: string, image: string, scenario: (img: Qcow2Image) => Promise<void>): Promise<number> {
  for (let budget = 0; budget < 10_000; budget++) {
    const copy = join(dir, `crash-${budget}.qcow2`);
    copyFileSync(image, copy);
    const fs = await FsHostFile.open(copy, true);
    const file = new DyingFile(fs, budget);
    let crashed = false;
    try {
      const img = new Qcow2Image(file, await readHeader(file), { readOnly: false });
      await img.load();
      await scenario(img);
      await img.mutex.run(() => img.writeback());
      await img.settleTruncate();
    } catch (e) {
      if (!(e instanceof Crashed) && !(e instanceof Error && e.cause instanceof Crashed)) throw e;
      crashed = true;
    } finally {
      await fs.close();
    }
    const chk = qemuCheck(copy);
    assert.equal(chk['check-errors'], 0, `crash after ${budget} writes: ${JSON.stringify(chk)}`);
    assert.equal(chk.corruptions ?? 0, 0, `crash after ${budget} writes: ${JSON.stringify(chk)}`);
    if (!crashed) {
      assert.equal(chk.leaks ?? 0, 0, `completed without a crash: ${JSON.stringify(chk)}`);
      return budget;
    }
  }
  throw new Error('scenario never completed');
}

const MiB = 1024 * 1024;

async function imageWithData(dir: string, clusterSize: number, size = 4 * MiB, refcountBits = 16, dataBytes = 3 * MiB): Promise<string> {
  const p = join(dir, 'start.qcow2');
  writeFileSync(join(dir, 'base.raw'), Buffer.alloc(2 * MiB, 0x11));
  await createQcow2(p, { size, clusterSize, refcountBits, backingFile: 'base.raw', backingFormat: 'raw' });
  const g = newGraph();
  const n = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: p } });
  for (let off = 0; off < dataBytes; off += 48 * 1024 + 512) await n.write(off, Buffer.alloc(20000, 0x22));
  await g.closeAll();
  return p;
}

test('a crash at any write of a writeback (allocations, zeroes, discards) leaves no corruption', async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const start = await imageWithData(dir, 4096);
  const points = await everyCrashPoint(dir, start, async (img) => {
    await writeRange(img, 100 * 1024, Buffer.alloc(300 * 1024, 0x33));
    await writeRange(img, 3 * MiB + 5000, Buffer.alloc(600 * 1024, 0x44)); // new L2 table
    await zeroRange(img, 512 * 1024, 256 * 1024);
    await discardRange(img, MiB, 512 * 1024, false);
    await discardRange(img, 2 * MiB, 256 * 1024, true);
  });
  assert.ok(points > 10, `enough crash points (${points})`);
  t.diagnostic(`${points} crash points`);
});

test('a crash at any write of make_empty (fast path) leaves no corruption', async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const start = await imageWithData(dir, 65536);
  const points = await everyCrashPoint(dir, start, async (img) => {
    await makeEmpty(img);
  });
  assert.ok(points >= 3, `crash points (${points})`);
  t.diagnostic(`make_empty fast path: ${points} crash points`);
});

test('a crash at any write of make_empty (slow path) and of an L1 table move leaves no corruption', async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  const dir = tempDir(t);
  // 512-byte clusters, 64-bit refcounts and 128 MiB: the L1 table (64 clusters) does not fit
  // in the 64 clusters the first refcount block describes, so make_empty takes the slow path
  const start = await imageWithData(dir, 512, 128 * MiB, 64, 400 * 1024);
  const slow = await everyCrashPoint(dir, start, async (img) => {
    assert.equal(await makeEmpty(img), 'slow');
  });
  assert.ok(slow > 3, `crash points (${slow})`);
  t.diagnostic(`make_empty slow path: ${slow} crash points`);
  const grow = await everyCrashPoint(dir, start, async (img) => {
    await img.mutex.run(() => img.setSize(256 * MiB));
    await writeRange(img, 200 * MiB, Buffer.alloc(4096, 0x55));
  });
  assert.ok(grow > 3, `crash points (${grow})`);
  t.diagnostic(`L1 move: ${grow} crash points`);
});

test('a crash at any write while the refcount table grows leaves no corruption', async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  const dir = tempDir(t);
  // 512-byte clusters with 64-bit refcounts: the first refcount table covers 2 MiB of file
  const start = await imageWithData(dir, 512, 8 * MiB, 64, 4 * MiB);
  const before = (await FsHostFile.open(start, false).then(async (f) => {
    const h = await readHeader(f);
    await f.close();
    return h.refcountTableClusters;
  }));
  const points = await everyCrashPoint(dir, start, async (img) => {
    await writeRange(img, 5 * MiB, Buffer.alloc(700 * 1024, 0x66));
    assert.ok(img.refcounts.tableClusters > before, 'the refcount table grew');
  });
  t.diagnostic(`refcount table growth: ${points} crash points`);
});

/**
 * A host file whose writes are durable only once flushed, or at once when FUA ("stable"):
 * a crash may keep any subset of the writes and truncations issued since the last flush.
 * `variants()` gives, for the operations pending at the crash, the file with none, all,
 * each one alone and all but each one of them (FUA writes are always in).
 */
class ReorderingFile implements HostFile {
  ops = 0;
  private durable: Buffer;
  private pending: Array<{ kind: 'write'; offset: number; data: Buffer; stable: boolean } | { kind: 'truncate'; length: number }> = [];
  constructor(
    private readonly inner: FsHostFile,
    start: Buffer,
    private readonly budget: number,
  ) {
    this.durable = Buffer.from(start);
  }
  read(offset: number, length: number): Promise<Buffer> {
    return this.inner.read(offset, length);
  }
  async write(offset: number, data: Buffer, stable = false): Promise<void> {
    if (this.ops++ >= this.budget) throw new Crashed('crashed');
    this.pending.push({ kind: 'write', offset, data: Buffer.from(data), stable });
    await this.inner.write(offset, data);
  }
  async flush(): Promise<void> {
    this.durable = this.apply(this.pending.map(() => true));
    this.pending = [];
  }
  length(): number {
    return this.inner.length();
  }
  async truncate(length: number): Promise<void> {
    if (this.ops++ >= this.budget) throw new Crashed('crashed');
    this.pending.push({ kind: 'truncate', length });
    await this.inner.truncate(length);
  }
  private apply(keep: boolean[]): Buffer {
    let b = Buffer.from(this.durable);
    this.pending.forEach((op, i) => {
      if (op.kind === 'write' && (keep[i] || op.stable)) {
        if (op.offset + op.data.length > b.length) b = Buffer.concat([b, Buffer.alloc(op.offset + op.data.length - b.length)]);
        op.data.copy(b, op.offset);
      } else if (op.kind === 'truncate' && keep[i]) {
        b = op.length <= b.length ? b.subarray(0, op.length) : Buffer.concat([b, Buffer.alloc(op.length - b.length)]);
      }
    });
    return b;
  }
  variants(): Array<{ name: string; bytes: Buffer }> {
    const n = this.pending.length;
    const out = [
      { name: 'none of the pending', bytes: this.apply(Array<boolean>(n).fill(false)) },
      { name: 'all of the pending', bytes: this.apply(Array<boolean>(n).fill(true)) },
    ];
    for (let i = 0; i < n; i++) {
      out.push({ name: `only pending op ${i}`, bytes: this.apply(Array.from({ length: n }, (_, j) => j === i)) });
      out.push({ name: `all but pending op ${i}`, bytes: this.apply(Array.from({ length: n }, (_, j) => j !== i)) });
    }
    return out;
  }
}

test('make_empty (fast path) with writes lost unless flushed or FUA: every crash leaves no corruption', async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const start = await imageWithData(dir, 65536);
  const startBytes = readFileSync(start);
  let checked = 0;
  for (let budget = 0; budget < 100; budget++) {
    const copy = join(dir, `reorder-${budget}.qcow2`);
    copyFileSync(start, copy);
    const fs = await FsHostFile.open(copy, true);
    const file = new ReorderingFile(fs, startBytes, budget);
    let crashed = false;
    try {
      const img = new Qcow2Image(file, await readHeader(file), { readOnly: false });
      await img.load();
      // the dirty state a checkpoint finds: new data and tables written, nothing flushed
      await file.flush();
      await writeRange(img, 3 * MiB + 5000, Buffer.alloc(300 * 1024, 0x44));
      await img.mutex.run(() => img.writeback());
      assert.equal(await makeEmpty(img), 'fast');
      await img.settleTruncate();
    } catch (e) {
      if (!(e instanceof Crashed) && !(e instanceof Error && e.cause instanceof Crashed)) throw e;
      crashed = true;
    } finally {
      await fs.close();
    }
    for (const v of file.variants()) {
      const p = join(dir, 'variant.qcow2');
      writeFileSync(p, v.bytes);
      const chk = qemuCheck(p);
      const what = `crash after ${budget} operations, ${v.name}: ${JSON.stringify(chk)}`;
      assert.equal(chk['check-errors'], 0, what);
      assert.equal(chk.corruptions ?? 0, 0, what);
      checked++;
    }
    if (!crashed) {
      t.diagnostic(`make_empty with reordering: ${budget} crash points, ${checked} images checked`);
      return;
    }
  }
  assert.fail('the scenario never completed');
});

/**
 * A file that can be replaced like the file driver does it (the empty image written beside
 * it, then renamed over it), and that dies after `budget` writes, preparations or renames.
 */
class DyingReplaceableFile implements HostFile {
  ops = 0;
  constructor(
    private inner: FsHostFile,
    private readonly path: string,
    private readonly budget: number,
  ) {}
  private step(): void {
    if (this.ops++ >= this.budget) throw new Crashed('crashed');
  }
  read(offset: number, length: number): Promise<Buffer> {
    return this.inner.read(offset, length);
  }
  async write(offset: number, data: Buffer): Promise<void> {
    this.step();
    await this.inner.write(offset, data);
  }
  flush(): Promise<void> {
    return this.inner.flush();
  }
  length(): number {
    return this.inner.length();
  }
  async truncate(length: number): Promise<void> {
    this.step();
    await this.inner.truncate(length);
  }
  async prepareReplacement(content: Buffer): Promise<PreparedReplacement> {
    const spare = `${this.path}.spare`;
    this.step();
    writeFileSync(spare, content);
    return {
      commit: async () => {
        this.step();
        renameSync(spare, this.path);
        const old = this.inner;
        this.inner = await FsHostFile.open(this.path, true);
        await old.close();
      },
      discard: async () => rmSync(spare, { force: true }),
    };
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

test('make_empty (swap path): a crash at any step leaves the old image byte for byte, or the new empty one', async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const start = await imageWithData(dir, 65536);
  const startBytes = readFileSync(start);
  let expectedEmpty: Buffer | null = null;
  for (let budget = 0; budget < 100; budget++) {
    const copy = join(dir, `swap-${budget}.qcow2`);
    copyFileSync(start, copy);
    const file = new DyingReplaceableFile(await FsHostFile.open(copy, true), copy, budget);
    let crashed = false;
    let path = '';
    try {
      const img = new Qcow2Image(file, await readHeader(file), { readOnly: false });
      await img.load();
      const spare = new EmptySpare(file);
      spare.prepare(img);
      await spare.idle();
      path = await makeEmpty(img, spare);
      await img.mutex.run(() => img.writeback());
      await img.settleTruncate();
      await spare.close();
    } catch (e) {
      if (!(e instanceof Crashed) && !(e instanceof Error && e.cause instanceof Crashed)) throw e;
      crashed = true;
    } finally {
      await file.close();
    }
    const chk = qemuCheck(copy);
    assert.equal(chk['check-errors'], 0, `crash after ${budget} steps: ${JSON.stringify(chk)}`);
    assert.equal(chk.corruptions ?? 0, 0, `crash after ${budget} steps: ${JSON.stringify(chk)}`);
    const bytes = readFileSync(copy);
    if (crashed) {
      // nothing was written in place: the crash left the old image
      assert.ok(bytes.equals(startBytes), `crash after ${budget} steps: the old image, unchanged`);
      continue;
    }
    assert.equal(path, 'swap');
    assert.equal(chk.leaks ?? 0, 0, JSON.stringify(chk));
    expectedEmpty = bytes;
    // the new image is the one the fast path leaves (same metadata, data dropped)
    const fastCopy = join(dir, 'fast.qcow2');
    copyFileSync(start, fastCopy);
    const fs = await FsHostFile.open(fastCopy, true);
    try {
      const img = new Qcow2Image(fs, await readHeader(fs), { readOnly: false });
      await img.load();
      assert.equal(await makeEmpty(img), 'fast');
      await img.settleTruncate();
    } finally {
      await fs.close();
    }
    const fastBytes = readFileSync(fastCopy);
    assert.equal(expectedEmpty.length, fastBytes.length);
    assert.ok(expectedEmpty.equals(fastBytes), 'byte for byte the image the fast path leaves');
    t.diagnostic(`make_empty swap path: ${budget} crash points`);
    assert.ok(budget >= 2, `crash points (${budget})`);
    return;
  }
  assert.fail('the scenario never completed');
});
