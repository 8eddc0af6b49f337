// Crash safety: a child process writes, discards and flushes through lockstep in a loop and
// is killed with SIGKILL at random moments. After every kill qemu-img check must find no
// corruption (leaked clusters are acceptable) and every write whose flush completed must
// read back, except where a later write may have landed over it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { dirname, join } from 'node:path';
import { newGraph, tempDir } from '../../../helpers/graph.js';
import { createQcow2 } from '../../../../src/block/drivers/qcow2/create.js';
import { crashOp } from './crash-ops.js';
import { needTools, qemuCheck } from './tools.js';

const WRITER = join(dirname(fileURLToPath(import.meta.url)), 'crash-writer.js');
const SIZE = 32 * 1024 * 1024;
const BATCH = 4;

/** Runs the writer until `killAfterMs` after its first output; returns the flushed seeds. */
function runWriter(image: string, firstSeed: number, killAfterMs: number): Promise<number[]> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [WRITER, image, String(firstSeed), String(BATCH)], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    let timer: NodeJS.Timeout | null = null;
    const guard = setTimeout(() => child.kill('SIGKILL'), 20_000);
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (d: string) => {
      out += d;
      timer ??= setTimeout(() => child.kill('SIGKILL'), killAfterMs);
    });
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    child.on('error', reject);
    child.on('exit', (code, signal) => {
      clearTimeout(guard);
      if (timer) clearTimeout(timer);
      if (signal !== 'SIGKILL') return reject(new Error(`writer exited by itself (${code}): ${err}`));
      // only complete lines: a batch is reported once its flush completed
      const complete = out.slice(0, out.lastIndexOf('\n') + 1);
      resolve(complete.split('\n').filter(Boolean).map(Number));
    });
  });
}

const CONFIGS = [
  { clusterSize: 4096, refcountBits: 16, rounds: 10 },
  // 64-bit refcounts on 512-byte clusters: the refcount table covers only 2 MiB of file,
  // so refcount blocks and table growth happen under the kills too
  { clusterSize: 512, refcountBits: 64, rounds: 6 },
];

for (const cfg of CONFIGS) test(`SIGKILL at random moments never corrupts the image nor loses flushed writes (cluster ${cfg.clusterSize}, refcount ${cfg.refcountBits} bits)`, async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const image = join(dir, 'crash.qcow2');
  await createQcow2(image, { size: SIZE, clusterSize: cfg.clusterSize, refcountBits: cfg.refcountBits });
  const cs = cfg.clusterSize;
  const model = Buffer.alloc(SIZE);
  const known = new Uint8Array(SIZE).fill(1); // a new image reads as zeroes everywhere
  let rounds = 0;
  let flushedWrites = 0;
  for (let round = 0; round < cfg.rounds; round++) {
    const firstSeed = 1 + round * 1_000_000;
    const killAfter = 30 + ((round * 7919) % 10) * 40;
    const seeds = await runWriter(image, firstSeed, killAfter);
    assert.ok(seeds.length > 0, 'the writer reported flushed batches');
    for (let i = 0; i < seeds.length; i++) assert.equal(seeds[i], firstSeed + i, 'batches are reported in order');
    const apply = (seed: number, flushed: boolean): void => {
      const op = crashOp(seed, SIZE);
      if (op.kind === 'write') {
        if (flushed) op.data.copy(model, op.offset);
        known.fill(flushed ? 1 : 0, op.offset, op.offset + op.data.length);
      } else {
        const first = Math.ceil(op.offset / cs) * cs;
        const last = Math.floor((op.offset + op.length) / cs) * cs;
        if (last > first) {
          if (flushed) model.fill(0, first, last);
          known.fill(flushed ? 1 : 0, first, last);
        }
      }
    };
    for (const s of seeds) apply(s, true);
    // the batch after the last reported one may have landed partly: unknown bytes
    const next = firstSeed + seeds.length;
    for (let s = next; s < next + BATCH; s++) apply(s, false);
    flushedWrites += seeds.length;

    const chk = qemuCheck(image);
    if (process.env.QCOW2_CRASH_DEBUG) console.log(`round ${round}: ${seeds.length} flushed ops, check ${JSON.stringify(chk)}`);
    assert.equal(chk['check-errors'], 0, JSON.stringify(chk));
    assert.equal(chk.corruptions ?? 0, 0, `round ${round}: qemu-img check found corruptions: ${JSON.stringify(chk)}`);

    const g = newGraph();
    const node = await g.open({ driver: 'qcow2', 'read-only': true, file: { driver: 'file', filename: image } });
    try {
      const got = await node.read(0, SIZE);
      for (let i = 0; i < SIZE; i++) {
        if (known[i] && got[i] !== model[i]) assert.fail(`round ${round}: byte ${i} reads ${got[i]}, flushed data says ${model[i]}`);
      }
    } finally {
      await g.closeAll();
    }
    rounds++;
  }
  assert.equal(rounds, cfg.rounds);
  assert.ok(flushedWrites > 20, `enough flushed writes were checked (${flushedWrites})`);
});
