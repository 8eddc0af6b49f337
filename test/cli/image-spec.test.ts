// What qemu-img and qemu-io open for an image argument (src/cli/image-spec.ts).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { completeImageOptions, filenameOptions, imageOptions } from '../../src/cli/image-spec.js';
import { tempDir } from '../helpers/graph.js';

test('a filename and -f FMT become format over file', () => {
  assert.deepEqual(filenameOptions('a.img', 'raw'), { driver: 'raw', file: { driver: 'file', filename: 'a.img' } });
  assert.deepEqual(filenameOptions('a.qcow2', 'qcow2'), { driver: 'qcow2', file: { driver: 'file', filename: 'a.qcow2' } });
  assert.deepEqual(filenameOptions('a.img', 'file'), { driver: 'file', filename: 'a.img' });
});

test('a plain filename: the format is -f, else probed', async (t) => {
  const dir = tempDir(t);
  const q = join(dir, 'q.img');
  const r = join(dir, 'r.img');
  writeFileSync(q, Buffer.concat([Buffer.from('QFI\xfb', 'latin1'), Buffer.alloc(508)]));
  writeFileSync(r, Buffer.alloc(512, 1));
  assert.deepEqual(await imageOptions(q), { dict: filenameOptions(q, 'qcow2'), keyval: false, probed: true });
  assert.deepEqual(await imageOptions(r), { dict: filenameOptions(r, 'raw'), keyval: false, probed: true });
  assert.deepEqual(await imageOptions(q, 'raw'), { dict: filenameOptions(q, 'raw'), keyval: false, probed: false });
});

test('json: filenames and incomplete image options', async (t) => {
  const dir = tempDir(t);
  const r = join(dir, 'r.img');
  writeFileSync(r, Buffer.alloc(512));
  // the file child defaults to the file protocol; without a driver the format is probed
  assert.deepEqual(await imageOptions(`json:{"file.filename":${JSON.stringify(r)}}`), {
    dict: { driver: 'raw', file: { driver: 'file', filename: r } },
    keyval: false,
    probed: true,
  });
  // -f overrides the JSON's driver, as in QEMU
  const spec = await imageOptions(`json:{"driver":"qcow2","file":{"driver":"file","filename":${JSON.stringify(r)}}}`, 'raw');
  assert.equal(spec.dict.driver, 'raw');
  await assert.rejects(completeImageOptions({}), { message: 'Must specify either driver or file' });
  assert.deepEqual((await completeImageOptions({ filename: r })).dict, { driver: 'raw', file: { driver: 'file', filename: r } });
});

test('an NBD URI: nbd protocol options under -f, else raw, never probed', async () => {
  assert.deepEqual(await imageOptions('nbd://h/e'), {
    dict: { driver: 'raw', file: { driver: 'nbd', server: { type: 'inet', host: 'h', port: '10809' }, export: 'e' } },
    keyval: false,
    probed: false,
  });
  assert.equal((await imageOptions('nbd://h/e', 'qcow2')).dict.driver, 'qcow2');
});
