// The two log formats: JSON lines exactly as before, and short human lines for a terminal.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Logger, defaultLogFormat, formatHuman, parseLogFormat } from '../../src/util/log.js';

test('json: one object per line, time, level and msg first, then the base and the fields', () => {
  const lines: string[] = [];
  const log = new Logger('info', (l) => lines.push(l)).child({ component: 'nbd' });
  log.info('export added', { id: 'e0', size: 10n, node: null });
  log.debug('not shown');
  assert.equal(lines.length, 1);
  assert.ok(lines[0]!.endsWith('\n'));
  assert.match(lines[0]!, /^\{"time":"\d{4}-\d\d-\d\dT[\d:.]+Z","level":"info","msg":"export added","component":"nbd","id":"e0","size":"10","node":null\}\n$/);
});

test('human: time of day, level, component, message and the fields that are set', () => {
  const lines: string[] = [];
  const log = new Logger('debug', (l) => lines.push(l), { component: 'pair' }, { format: 'human' });
  log.warn('the primary missed its heartbeat', { ageMs: 612, side: 'primary', note: null, serving: ['nbd://127.0.0.1:10809/disk', 'x y'] });
  log.debug('detail', { error: { code: 'EIO' } });
  assert.match(lines[0]!, /^\d\d:\d\d:\d\d\.\d{3} WARN  pair: the primary missed its heartbeat {2}ageMs=612 side=primary serving=nbd:\/\/127\.0\.0\.1:10809\/disk,"x y"\n$/);
  assert.match(lines[1]!, /^\d\d:\d\d:\d\d\.\d{3} DEBUG pair: detail {2}error=\{"code":"EIO"\}\n$/);
  assert.ok(!lines.join('').includes('\x1b'), 'no colour unless asked');
  assert.match(formatHuman({ time: new Date().toISOString(), level: 'error', msg: 'x' }, true), /\x1b\[31mERROR\x1b\[0m x$/);
});

test('the default format follows the stream, and a bad --log-format is named', () => {
  assert.equal(defaultLogFormat({ isTTY: true }), 'human');
  assert.equal(defaultLogFormat({}), 'json');
  assert.equal(parseLogFormat('human'), 'human');
  assert.throws(() => parseLogFormat('xml'), /--log-format: 'xml' is not one of json, human/);
});
