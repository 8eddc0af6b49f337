// `lockstep img rebase -u` rewrites the header cluster from what the qcow2 driver's own
// parser (qcow2/header.ts) read: every extension but the backing format kept, byte for byte
// and in order; a broken extension area refused with the parser's message.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { runRebase } from '../../../src/cli/img/rebase.js';
import { createQcow2 } from '../../../src/block/drivers/qcow2/create.js';
import { parseHeader, serializeHeader } from '../../../src/block/drivers/qcow2/header.js';
import { tempDir } from '../../helpers/graph.js';

const CLUSTER = 65536;

/** An overlay of base.qcow2 whose header also carries an extension lockstep does not know. */
async function overlayWithUnknownExtension(dir: string): Promise<string> {
  const file = join(dir, 'top.qcow2');
  await createQcow2(file, { size: 1 << 20, backingFile: 'base.qcow2', backingFormat: 'qcow2' });
  const img = readFileSync(file);
  const h = parseHeader(img.subarray(0, CLUSTER), img.length);
  h.unknownExtensions.push({ type: 0x12345678, data: Buffer.from('kept as it is') });
  serializeHeader(h).copy(img, 0);
  writeFileSync(file, img);
  return file;
}

test('rebase -u changes the backing name and format and keeps every other extension byte for byte', async (t) => {
  const dir = tempDir(t);
  const file = await overlayWithUnknownExtension(dir);
  const before = readFileSync(file);
  const h = parseHeader(before.subarray(0, CLUSTER), before.length);
  assert.equal(await runRebase(file, 'moved.raw', 'raw'), 0);
  const after = readFileSync(file);
  const expected = Buffer.alloc(CLUSTER);
  serializeHeader({ ...h, backingFile: 'moved.raw', backingFormat: 'raw' }).copy(expected);
  assert.ok(after.subarray(0, CLUSTER).equals(expected));
  assert.ok(after.subarray(CLUSTER).equals(before.subarray(CLUSTER)), 'nothing past the header cluster changes');
  const back = parseHeader(after.subarray(0, CLUSTER), after.length);
  assert.equal(back.backingFile, 'moved.raw');
  assert.equal(back.backingFormat, 'raw');
  assert.deepEqual(back.unknownExtensions, [{ type: 0x12345678, data: Buffer.from('kept as it is') }]);
});

test('rebase -u refuses an extension that overruns the header area, with the parser\'s message, and writes nothing', async (t) => {
  const dir = tempDir(t);
  const file = await overlayWithUnknownExtension(dir);
  const img = readFileSync(file);
  const h = parseHeader(img.subarray(0, CLUSTER), img.length);
  // the first extension (the backing format) claims more bytes than the cluster has
  img.writeUInt32BE(CLUSTER, h.headerLength + 4);
  writeFileSync(file, img);
  await assert.rejects(runRebase(file, 'moved.raw', 'raw'), {
    message: `Could not open '${file}': Invalid qcow2 image: header extension 0xe2792aca overruns the header area`,
  });
  assert.ok(readFileSync(file).equals(img));
});

test('rebase -u of a file that is not qcow2 is not supported', async (t) => {
  const dir = tempDir(t);
  const file = join(dir, 'disk.raw');
  writeFileSync(file, Buffer.alloc(CLUSTER, 1));
  await assert.rejects(runRebase(file, 'b', undefined), { message: `Could not change the backing file to 'b': Operation not supported` });
});
