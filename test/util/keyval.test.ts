import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { InvalidArgumentError } from '../../src/errors.js';
import { expandDottedKeys, parseJsonOptions, parseKeyval, parseOptionString } from '../../src/util/keyval.js';
import { newGraph, tempDir } from '../helpers/graph.js';

function rejects(fn: () => unknown, message: string): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof InvalidArgumentError, `expected InvalidArgumentError, got ${String(e)}`);
    assert.equal(e.message, message);
    return true;
  });
}

test('dotted keys build nested dicts with string leaves', () => {
  assert.deepEqual(parseKeyval('driver=raw,file.driver=file,file.filename=a.img'), {
    driver: 'raw',
    file: { driver: 'file', filename: 'a.img' },
  });
  assert.deepEqual(parseKeyval('driver=qcow2,file.driver=file,file.filename=a.qcow2,backing=base0'), {
    driver: 'qcow2',
    file: { driver: 'file', filename: 'a.qcow2' },
    backing: 'base0',
  });
});

test('a child given as a name stays a string reference', () => {
  assert.deepEqual(parseKeyval('driver=raw,file=node0'), { driver: 'raw', file: 'node0' });
});

test(',, escapes a comma in a value; a trailing comma is allowed', () => {
  assert.deepEqual(parseKeyval('driver=raw,file.filename=a,,b.img'), { driver: 'raw', file: { filename: 'a,b.img' } });
  assert.deepEqual(parseKeyval('driver=raw,,x'), { driver: 'raw,x' });
  assert.deepEqual(parseKeyval('driver=raw,'), { driver: 'raw' });
  assert.deepEqual(parseKeyval('a=,b=1'), { a: '', b: '1' });
  assert.deepEqual(parseKeyval(''), {});
});

test('values keep = and spaces', () => {
  assert.deepEqual(parseKeyval('a=x=y,b= z '), { a: 'x=y', b: ' z ' });
});

test('the last of duplicate keys wins', () => {
  assert.deepEqual(parseKeyval('file.filename=a.img,file.filename=b.img'), { file: { filename: 'b.img' } });
});

test('an implied first key', () => {
  assert.deepEqual(parseKeyval('nbd,id=e0,node-name=n0', { impliedKey: 'type' }), { type: 'nbd', id: 'e0', 'node-name': 'n0' });
  // an explicit first key still works, and the implied key applies to the first element only
  assert.deepEqual(parseKeyval('type=nbd,id=e0', { impliedKey: 'type' }), { type: 'nbd', id: 'e0' });
  assert.deepEqual(parseKeyval('nbd,id=e0', 'type'), { type: 'nbd', id: 'e0' });
  rejects(() => parseKeyval('nbd,x', { impliedKey: 'type' }), "Expected '=' after parameter 'x'");
});

test('numeric fragments are array members, kept as dicts with canonical keys', () => {
  assert.deepEqual(parseKeyval('driver=quorum,children.0.driver=raw,children.1=disk1'), {
    driver: 'quorum',
    children: { '0': { driver: 'raw' }, '1': 'disk1' },
  });
  assert.deepEqual(parseKeyval('x.1=b,x.0=a'), { x: { '0': 'a', '1': 'b' } });
  assert.deepEqual(parseKeyval('x.00=a'), { x: { '0': 'a' } });
});

test('every keyval error, with QEMU wording', () => {
  rejects(() => parseKeyval('driver=raw,a=1,a.b=2'), "Parameters 'a.*' used inconsistently");
  rejects(() => parseKeyval('driver=raw,a.b=2,a=1'), "Parameters 'a.*' used inconsistently");
  rejects(() => parseKeyval('a.b.c=1,a.b=2'), "Parameters 'a.b.*' used inconsistently");
  rejects(() => parseKeyval('driver=raw,file=x,file.driver=file'), "Parameters 'file.*' used inconsistently");
  rejects(() => parseKeyval('x.0=a,x.a=b'), "Parameters 'x.*' used inconsistently");
  rejects(() => parseKeyval('driver=raw,x.1=a'), "Parameter 'x.0' missing");
  rejects(() => parseKeyval('a.01=x'), "Parameter 'a.0' missing");
  rejects(() => parseKeyval('a.b.0=x,a.b.2=y'), "Parameter 'a.b.1' missing");
  rejects(() => parseKeyval('driver=raw,x'), "Expected '=' after parameter 'x'");
  rejects(() => parseKeyval('driver=raw,x.y'), "Expected '=' after parameter 'x.y'");
  rejects(() => parseKeyval('driver'), "Expected '=' after parameter 'driver'");
  rejects(() => parseKeyval('driver=raw,1=2'), "Invalid parameter '1'");
  rejects(() => parseKeyval('driver=raw,.x=1'), "Invalid parameter '.x'");
  rejects(() => parseKeyval('driver=raw,a..b=1'), "Invalid parameter 'a..b'");
  rejects(() => parseKeyval('driver=raw,a.=1'), "Invalid parameter 'a.'");
  rejects(() => parseKeyval('driver=raw,a b=1'), "Invalid parameter 'a b'");
  rejects(() => parseKeyval('=raw'), "Invalid parameter ''");
  rejects(() => parseKeyval(','), "Invalid parameter ''");
  const long = 'a'.repeat(128);
  rejects(() => parseKeyval(`${long}=1`), `Parameter '${long}' is too long`);
  rejects(() => parseKeyval(`x.${long}=1`), `Parameter fragment '${long}' is too long`);
  // 127 characters is the longest fragment QEMU accepts
  assert.deepEqual(parseKeyval(`${'a'.repeat(127)}=1`), { ['a'.repeat(127)]: '1' });
});

test('missing required parameters are reported by the graph with QEMU wording', async (t) => {
  const g = newGraph();
  t.after(() => g.closeAll());
  await assert.rejects(g.open(parseKeyval(''), { keyval: true }), { message: "Parameter 'driver' is missing" });
  await assert.rejects(g.open(parseKeyval('driver=raw'), { keyval: true }), { message: "Parameter 'file' is missing" });
  await assert.rejects(g.open(parseKeyval('driver=raw,file=nosuch'), { keyval: true }), {
    message: "Cannot find device='nosuch' nor node-name='nosuch'",
  });
});

test('keyval options open a node; a file=NAME reference reuses an existing node', async (t) => {
  const dir = tempDir(t);
  const img = join(dir, 'a.img');
  writeFileSync(img, Buffer.alloc(4096, 0x5a));
  const g = newGraph();
  t.after(() => g.closeAll());
  const proto = await g.open(parseKeyval(`driver=file,filename=${img},node-name=proto0`), { keyval: true });
  const top = await g.open(parseKeyval('driver=raw,file=proto0,offset=1k,node-name=top0'), { keyval: true });
  assert.equal(top.file, proto);
  assert.equal(top.getLength(), 3072);
  assert.ok((await top.read(0, 3072)).equals(Buffer.alloc(3072, 0x5a)));
});

test('JSON options: typed leaves, dotted keys expanded and merged', () => {
  assert.deepEqual(parseJsonOptions('{"driver":"raw","size":4096,"file":{"driver":"file","filename":"a.img"}}'), {
    driver: 'raw',
    size: 4096,
    file: { driver: 'file', filename: 'a.img' },
  });
  assert.deepEqual(parseJsonOptions('{"driver":"raw","file.driver":"file","file":{"filename":"a.img"}}'), {
    driver: 'raw',
    file: { driver: 'file', filename: 'a.img' },
  });
  // the later spelling of one leaf wins, as in QEMU's flattened dict
  assert.deepEqual(expandDottedKeys({ 'file.filename': 'a', file: { filename: 'b' } }), { file: { filename: 'b' } });
});

test('every JSON error', () => {
  rejects(() => parseJsonOptions('[1]'), 'Invalid JSON object given');
  rejects(() => parseJsonOptions('"x"'), 'Invalid JSON object given');
  assert.throws(() => parseJsonOptions('{"driver":'), (e: unknown) => {
    assert.ok(e instanceof InvalidArgumentError);
    assert.match(e.message, /^Could not parse the JSON options: /);
    return true;
  });
  rejects(
    () => parseJsonOptions('{"driver":"raw","file":"x","file.filename":"a.img"}'),
    'Cannot reference an existing block device with additional options or a new filename',
  );
  rejects(() => parseJsonOptions('{"a":1,"a.b":2}'), "Parameters 'a.*' used inconsistently");
  rejects(() => parseJsonOptions('{"a.":1}'), "Invalid parameter 'a.'");
});

test('parseOptionString picks the spelling: {...}, json:{...} or keyval', () => {
  assert.deepEqual(parseOptionString('{"driver":"null-co","size":512}'), { dict: { driver: 'null-co', size: 512 }, keyval: false });
  assert.deepEqual(parseOptionString('json:{"driver":"null-co"}'), { dict: { driver: 'null-co' }, keyval: false });
  assert.deepEqual(parseOptionString('driver=null-co,size=512'), { dict: { driver: 'null-co', size: '512' }, keyval: true });
  assert.deepEqual(parseOptionString('nbd,id=e', { impliedKey: 'type' }), { dict: { type: 'nbd', id: 'e' }, keyval: true });
});

