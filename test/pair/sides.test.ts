// The transport rule of `pair run` decides loopback by parsed address (issue 15 item 9): a
// name is resolved first and every address it resolves to must be loopback.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { checkTransport, isLoopback, isLoopbackAddress } from '../../src/pair/sides.js';

test('literal addresses: 127.0.0.0/8 and ::1 in any spelling, nothing else', () => {
  for (const a of ['127.0.0.1', '127.1.2.3', '127.255.255.255', '::1', '[::1]', '0:0:0:0:0:0:0:1', '::ffff:127.0.0.1', '::ffff:7f00:2']) {
    assert.equal(isLoopbackAddress(a), true, a);
  }
  for (const a of ['128.0.0.1', '10.0.0.1', '0.0.0.0', '::', '::2', '::ffff:10.0.0.1', '127.attacker.invalid', 'localhost', '1127.0.0.1']) {
    assert.equal(isLoopbackAddress(a), false, a);
  }
});

test('names are resolved and every address must be loopback', async () => {
  const dns = (table: Record<string, string[]>) => async (h: string) => {
    const r = table[h];
    if (!r) throw Object.assign(new Error(`ENOTFOUND ${h}`), { code: 'ENOTFOUND' });
    return r;
  };
  const resolve = dns({ localhost: ['127.0.0.1', '::1'], '127.attacker.invalid': ['203.0.113.9'], mixed: ['127.0.0.1', '203.0.113.9'] });
  assert.equal(await isLoopback('localhost', resolve), true);
  assert.equal(await isLoopback('127.attacker.invalid', resolve), false);
  assert.equal(await isLoopback('mixed', resolve), false);
  assert.equal(await isLoopback('nowhere.invalid', resolve), false);
  assert.equal(await isLoopback('127.0.0.5', resolve), true);
  // the rule as `pair run` applies it
  await assert.rejects(
    checkTransport({ primaryQmp: { type: 'inet', host: '127.attacker.invalid', port: 4444 } }, { type: 'unix', path: '/x' }, resolve),
    /primary QMP 127.attacker.invalid is not a loopback address: give TLS credentials \(--tls-dir\) or allow plain TCP with --insecure/,
  );
  await checkTransport({ primaryQmp: { type: 'inet', host: 'localhost', port: 4444 } }, { type: 'inet', host: '127.0.0.1', port: 10810 }, resolve);
  await checkTransport({ insecure: true, primaryQmp: { type: 'inet', host: '127.attacker.invalid', port: 4444 } }, { type: 'unix', path: '/x' }, resolve);
});
