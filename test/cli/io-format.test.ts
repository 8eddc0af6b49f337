import { test } from 'node:test';
import assert from 'node:assert/strict';
import { elapsedText, hexDump, humanSize, ioReport } from '../../src/cli/io-format.js';

// Expected strings are qemu-io 7.2 output seen for the same values.
test('sizes are spelled as qemu-io does', () => {
  assert.equal(humanSize(0), '0 bytes');
  assert.equal(humanSize(512), '512 bytes');
  assert.equal(humanSize(65.521087), '65.521087 bytes');
  assert.equal(humanSize(4096), '4 KiB');
  assert.equal(humanSize(743.747 * 1024), '743.747 KiB');
  assert.equal(humanSize(1179648), '1.125 MiB');
  assert.equal(humanSize(0x2e0000), '2.875 MiB');
  assert.equal(humanSize(2 ** 30), '1 GiB');
  assert.equal(humanSize(512 * 2 ** 20), '512 MiB');
});

test('elapsed time below and above one second', () => {
  assert.equal(elapsedText(0.004), '00.00 sec');
  assert.equal(elapsedText(0.0234), '00.02 sec');
  assert.equal(elapsedText(1.5017), '0:00:01.50');
  assert.equal(elapsedText(62.51), '0:01:02.51');
  assert.equal(elapsedText(3725.25), '1:02:05.25');
  assert.equal(elapsedText(0.02, true), '0:00:00.02');
});

test('report lines', () => {
  assert.equal(
    ioReport('read', 1.5017, 0, 4096, 4096, 1, false),
    'read 4096/4096 bytes at offset 0\n4 KiB, 1 ops; 0:00:01.50 (2.664 KiB/sec and 0.6659 ops/sec)\n',
  );
  assert.equal(ioReport('read', 1.5017, 0, 4096, 4096, 1, true), '4096,1,0:00:01.50,2727.575,0.666\n');
});

test('hex dump: alphanumerics shown, partial last line unpadded', () => {
  const buf = Buffer.from('Hello, World! abc_-.\0', 'latin1');
  assert.equal(
    hexDump(buf, 0),
    '00000000:  48 65 6c 6c 6f 2c 20 57 6f 72 6c 64 21 20 61 62  Hello..World..ab\n' + '00000010:  63 5f 2d 2e 00  c....\n',
  );
  assert.equal(hexDump(Buffer.from([0xff]), 0x1f4), '000001f4:  ff  .\n');
});
