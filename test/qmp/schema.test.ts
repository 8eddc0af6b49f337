import { test } from 'node:test';
import assert from 'node:assert/strict';
import { checkValue, coerceStrings, nestDotted, validateArguments } from '../../src/qmp/schema/types.js';
import { NBD_SERVER_START, BLOCK_EXPORT_ADD, SOCKET_ADDRESS } from '../../src/qmp/schema/nbd.js';
import { BLOCKDEV_BACKUP, BLOCKDEV_REOPEN } from '../../src/qmp/schema/block.js';
import { OBJECT_ADD } from '../../src/qmp/schema/misc.js';

function message(fn: () => unknown): string {
  try {
    fn();
  } catch (e) {
    return (e as Error).message;
  }
  return 'no error';
}

// Each row: schema, arguments, QEMU 7.2's answer (checked against qemu-system-x86_64 7.2).
const ROWS: Array<[string, Parameters<typeof validateArguments>[0], Record<string, unknown>, string]> = [
  ['unexpected member', { '*flat': 'bool' }, { x: 1 }, "Parameter 'x' is unexpected"],
  ['bool type', { '*flat': 'bool' }, { flat: 'yes' }, "Invalid parameter type for 'flat', expected: boolean"],
  ['int type', BLOCKDEV_BACKUP, { device: 'a', target: 'b', sync: 'full', speed: true }, "Invalid parameter type for 'speed', expected: integer"],
  ['enum value', BLOCKDEV_BACKUP, { device: 'a', target: 'b', sync: 'fullx' }, "Parameter 'sync' does not accept value 'fullx'"],
  ['enum type', BLOCKDEV_BACKUP, { device: 'a', target: 'b', sync: 3 }, "Invalid parameter type for 'sync', expected: string"],
  ['missing', BLOCKDEV_BACKUP, { device: 'a', target: 'b' }, "Parameter 'sync' is missing"],
  ['nested type', NBD_SERVER_START, { addr: { type: 'inet', data: { host: '127.0.0.1', port: 0 } } }, "Invalid parameter type for 'addr.data.port', expected: string"],
  ['nested missing', NBD_SERVER_START, { addr: { type: 'inet' } }, "Parameter 'addr.data' is missing"],
  ['union discriminator value names the member only', NBD_SERVER_START, { addr: { type: 'inetx', data: {} } }, "Parameter 'type' does not accept value 'inetx'"],
  ['nested string type', NBD_SERVER_START, { addr: { type: 'inet', data: { host: 1 } } }, "Invalid parameter type for 'addr.data.host', expected: string"],
  ['uint64', { 'write-threshold': 'uint64' }, { 'write-threshold': '1' }, "Parameter 'write-threshold' expects uint64"],
  ['list element path', BLOCKDEV_REOPEN, { options: [{}, 3] }, "Invalid parameter type for 'options[1]', expected: object"],
  ['object-add enum', OBJECT_ADD, { 'qom-type': 'foo', id: 't0' }, "Parameter 'qom-type' does not accept value 'foo'"],
  ['object-add branch member', OBJECT_ADD, { 'qom-type': 'tls-creds-x509', id: 't0', 'verify-peer': 'on' }, "Invalid parameter type for 'verify-peer', expected: boolean"],
  ['object-add unexpected', OBJECT_ADD, { 'qom-type': 'tls-creds-x509', id: 't0', x: 1 }, "Parameter 'x' is unexpected"],
];

for (const [name, schema, args, expected] of ROWS) {
  test(`validation: ${name}`, () => {
    assert.equal(message(() => validateArguments(schema, args)), expected);
  });
}

test('valid arguments pass unchanged', () => {
  const args = { addr: { type: 'unix', data: { path: '/tmp/x' } }, 'max-connections': 4 };
  assert.equal(validateArguments(NBD_SERVER_START, args), args);
  const exp = { type: 'nbd', id: 'e0', 'node-name': 'n0', writable: true, name: 'x', bitmaps: ['a'] };
  assert.equal(validateArguments(BLOCK_EXPORT_ADD, exp), exp);
});

test('key=value strings are typed by the schema, dotted keys nest, numeric keys become lists', () => {
  const nested = nestDotted([
    ['addr.type', 'inet'],
    ['addr.data.host', '::1'],
    ['addr.data.port', '10809'],
    ['max-connections', '4'],
  ]);
  assert.deepEqual(coerceStrings(NBD_SERVER_START, nested), {
    addr: { type: 'inet', data: { host: '::1', port: '10809' } },
    'max-connections': 4,
  });
  assert.deepEqual(coerceStrings(BLOCKDEV_BACKUP, { device: 'a', target: 'b', sync: 'none', 'auto-finalize': 'off', speed: '100' }), {
    device: 'a',
    target: 'b',
    sync: 'none',
    'auto-finalize': false,
    speed: 100,
  });
  assert.deepEqual(coerceStrings(BLOCK_EXPORT_ADD, { type: 'nbd', id: 'e', 'node-name': 'n', writable: 'on', bitmaps: { 0: 'a', 1: 'b' } }), {
    type: 'nbd',
    id: 'e',
    'node-name': 'n',
    writable: true,
    bitmaps: ['a', 'b'],
  });
  assert.deepEqual(coerceStrings(SOCKET_ADDRESS, { type: 'unix', path: '/x' }), { type: 'unix', path: '/x' });
  assert.equal(message(() => coerceStrings({ '*flat': 'bool' }, { flat: 'maybe' })), "Parameter 'flat' expects 'on' or 'off'");
  assert.equal(message(() => nestDotted([['a', '1'], ['a.b', '2']])), "Parameter 'a' used inconsistently");
});

test('checkValue accepts any JSON integer for int and refuses fractions', () => {
  assert.equal(checkValue('int', -5, 'x', 'x'), -5);
  assert.equal(message(() => checkValue('int', 1.5, 'x', 'x')), "Invalid parameter type for 'x', expected: integer");
});
