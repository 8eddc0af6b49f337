import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { probeFormat, probeFormatFromHeader } from '../../src/block/probe.js';
import { tempDir } from '../helpers/graph.js';

test('format probing: the qcow2 magic, else raw', async (t) => {
  assert.equal(probeFormatFromHeader(Buffer.from([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3])), 'qcow2');
  assert.equal(probeFormatFromHeader(Buffer.from([0x51, 0x46, 0x49, 0xfa])), 'raw');
  assert.equal(probeFormatFromHeader(Buffer.from([0x51, 0x46])), 'raw');
  assert.equal(probeFormatFromHeader(Buffer.alloc(0)), 'raw');
  const dir = tempDir(t);
  const q = join(dir, 'q.img');
  const r = join(dir, 'r.img');
  const empty = join(dir, 'e.img');
  writeFileSync(q, Buffer.concat([Buffer.from('QFI\xfb', 'latin1'), Buffer.alloc(508)]));
  writeFileSync(r, Buffer.alloc(512, 1));
  writeFileSync(empty, Buffer.alloc(0));
  assert.equal(await probeFormat(q), 'qcow2');
  assert.equal(await probeFormat(r), 'raw');
  assert.equal(await probeFormat(empty), 'raw');
  const missing = join(dir, 'missing.img');
  await assert.rejects(probeFormat(missing), { message: `Could not open '${missing}': No such file or directory` });
  await assert.rejects(probeFormat(dir), { message: `Could not read '${dir}': Is a directory` });
});
