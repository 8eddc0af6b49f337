// `lockstep demo`: the scripted pair run ends with the recovered disk compared with the
// primary's disk as read over NBD at the last checkpoint (64 overlapping writes in flight
// per round: only the disk itself knows which one landed last).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { LOCKSTEP_BIN } from '../helpers/processes.js';

test('lockstep demo: the recovered disk equals the primary disk read at the last checkpoint', async () => {
  const child = spawn(process.execPath, [LOCKSTEP_BIN, 'demo', '--size', '16M', '--rounds', '3'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (out += d.toString()));
  const code = await new Promise<number | null>((r) => child.once('exit', (c) => r(c)));
  assert.equal(code, 0, out);
  assert.match(out, /^round 3: 64 writes in \d+ ms, checkpoint pause/m);
  assert.match(out, /^read the primary's disk at the last checkpoint over NBD \(16 MiB in \d+ ms\)$/m);
  assert.match(out, /^verified: the recovered disk equals the disk at the last checkpoint, byte for byte \(16777216 bytes\)$/m);
});

test('lockstep demo: bad options are refused with a message naming them', async () => {
  for (const [args, msg] of [
    [['--size', '1000'], /--size: expected a multiple of 4 KiB, got '1000'/],
    [['--rounds', '0'], /--rounds: expected a positive integer/],
  ] as const) {
    const child = spawn(process.execPath, [LOCKSTEP_BIN, 'demo', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let err = '';
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    const code = await new Promise<number | null>((r) => child.once('exit', (c) => r(c)));
    assert.equal(code, 1);
    assert.match(err, msg);
  }
});
