// The live line at the bottom of a terminal: log lines printed while it shows are never glued
// to it, and off a terminal it is never drawn.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { LiveLine, bytesText, durationText, progressText } from '../../src/cli/terminal.js';

/** A terminal of `columns` that interprets \r and ESC[K, keeping the screen's lines. */
class FakeTerminal {
  isTTY = true;
  readonly lines: string[] = [''];
  constructor(readonly columns = 80) {}
  write(s: string): boolean {
    for (let i = 0; i < s.length; i++) {
      if (s.startsWith('\x1b[K', i)) {
        i += 2;
        continue; // the cursor is at the start of the line after \r in every use
      }
      const c = s[i]!;
      if (c === '\r') this.lines[this.lines.length - 1] = '';
      else if (c === '\n') this.lines.push('');
      else this.lines[this.lines.length - 1] += c;
    }
    return true;
  }
}

test('a log line printed under a progress line lands on its own line, the progress below it', () => {
  const tty = new FakeTerminal();
  const live = new LiveLine(tty);
  live.set(progressText('initial sync', 4 * 2 ** 20, 8 * 2 ** 20, 3.4));
  live.print('12:00:00.000 INFO  pair: created primary.qcow2\n');
  live.set(progressText('initial sync', 8 * 2 ** 20, 8 * 2 ** 20, 0));
  live.print('12:00:01.000 INFO  pair: initial sync done\n');
  live.clear();
  assert.deepEqual(tty.lines, ['12:00:00.000 INFO  pair: created primary.qcow2', '12:00:01.000 INFO  pair: initial sync done', '']);
});

test('the live line is redrawn after each printed line and cut to the width of the terminal', () => {
  const tty = new FakeTerminal(30);
  const live = new LiveLine(tty);
  live.set('protected | checkpoints 12 | last pause 1.20 ms | heartbeat 3 ms');
  assert.equal(tty.lines.at(-1)!.length, 29);
  assert.ok(tty.lines.at(-1)!.endsWith('…'));
  live.print('a log line\n');
  assert.deepEqual(tty.lines, ['a log line', 'protected | checkpoints 12 |…']);
});

test('off a terminal nothing is drawn in place', () => {
  const out: string[] = [];
  const live = new LiveLine({ isTTY: false, write: (s: string) => out.push(s) > 0 });
  live.set('initial sync: 50%');
  live.print('{"msg":"x"}\n');
  live.clear();
  assert.deepEqual(out, ['{"msg":"x"}\n']);
});

test('sizes, durations and progress read as qemu-img prints them', () => {
  assert.equal(bytesText(512), '512 B');
  assert.equal(bytesText(3.5 * 2 ** 20), '3.5 MiB');
  assert.equal(durationText(42.4), '42 s');
  assert.equal(durationText(185), '3 min 05 s');
  assert.equal(durationText(3720), '1 h 02 min');
  assert.equal(progressText('resync', 2 ** 30, 4 * 2 ** 30, 90), 'resync: 25.0% (1.0 GiB of 4.0 GiB), ETA 1 min 30 s');
  assert.equal(progressText('failover commit', 0, 0, null), 'failover commit: 100.0% (0 B of 0 B)');
});
