// Shutting a graph down: closeAll closes parents before children, so that a format's
// close-time writeback (qcow2's cached L2 and refcount tables, its clean mark) reaches its
// file, whoever still holds the top node; a writeback that fails is an error, not a log line.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { BlockGraph } from '../../src/block/graph.js';
import { createRegistry } from '../../src/block/registry.js';
import { createQcow2 } from '../../src/block/drivers/qcow2/create.js';
import { BlockError } from '../../src/errors.js';
import { faultControl, faultDriver } from '../helpers/fault-driver.js';
import { newGraph, pattern, tempDir } from '../helpers/graph.js';

const haveQemu = spawnSync('qemu-io', ['--version']).error === undefined;
const needQemu = haveQemu || process.env.CI ? {} : { skip: 'qemu-io is not installed' };

function qemuIoReads(file: string, pat: number, offset: number, length: number): boolean {
  const r = spawnSync('qemu-io', ['-f', 'qcow2', '-c', `read -P ${pat} ${offset} ${length}`, file], { encoding: 'utf8' });
  return r.status === 0 && !/verification failed|error/i.test(r.stdout + r.stderr);
}

function qemuCheckClean(file: string): void {
  const r = spawnSync('qemu-img', ['check', '--output=json', file], { encoding: 'utf8' });
  assert.equal(r.status, 0, r.stdout + r.stderr);
  const chk = JSON.parse(r.stdout) as Record<string, number>;
  assert.equal(chk['check-errors'] ?? 0, 0);
  assert.equal(chk.corruptions ?? 0, 0);
  assert.equal(chk.leaks ?? 0, 0);
}

test('closeAll with an unnamed backend still on a qcow2 node: the writes reach the file', needQemu, async (t) => {
  const dir = tempDir(t);
  const file = join(dir, 'a.qcow2');
  await createQcow2(file, { size: 4 << 20 });
  const g = newGraph();
  const node = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: file } });
  // an internal user (qemu-img's BlockBackend, a job) that nobody releases before shutdown
  const be = g.createBackend(node);
  for (let i = 0; i < 16; i++) await be.write(i * 65536, pattern(0x33, 65536));
  const removed: string[] = [];
  g.on('node-removed', (n: { driver: { name: string } }) => removed.push(n.driver.name));
  await g.closeAll();
  assert.deepEqual(removed, ['qcow2', 'file'], 'the format closes before its file');
  assert.equal(g.nodes.size, 0);
  assert.ok(be.closed);
  assert.ok(qemuIoReads(file, 0x33, 0, 1 << 20), 'qemu-io reads back what was written');
  qemuCheckClean(file);
});

test('closeAll: a chain whose backing was written (commit) closes top, backing, then the files', needQemu, async (t) => {
  const dir = tempDir(t);
  const base = join(dir, 'base.qcow2');
  const top = join(dir, 'top.qcow2');
  await createQcow2(base, { size: 4 << 20 });
  await createQcow2(top, { size: 4 << 20, backingFile: 'base.qcow2', backingFormat: 'qcow2' });
  const g = newGraph();
  const node = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: top } });
  g.createBackend(node);
  const backing = node.backing!;
  await backing.setReadOnly(false);
  await backing.write(2 << 20, pattern(0x44, 131072));
  await node.write(0, pattern(0x55, 65536));
  const order: string[] = [];
  g.on('node-removed', (n: { filename: string; driver: { name: string } }) => order.push(`${n.driver.name}:${n.filename.endsWith('top.qcow2') ? 'top' : 'base'}`));
  await g.closeAll();
  assert.equal(order.length, 4);
  assert.ok(order.indexOf('qcow2:top') < order.indexOf('file:top'));
  assert.ok(order.indexOf('qcow2:top') < order.indexOf('qcow2:base'));
  assert.ok(order.indexOf('qcow2:base') < order.indexOf('file:base'));
  assert.ok(qemuIoReads(base, 0x44, 2 << 20, 131072));
  assert.ok(qemuIoReads(top, 0x55, 0, 65536));
  assert.ok(qemuIoReads(top, 0x44, 2 << 20, 131072), 'the top reads through to what the base got');
  qemuCheckClean(base);
  qemuCheckClean(top);
});

test('a close-time writeback that fails makes closeAll fail, after closing every node', async (t) => {
  const dir = tempDir(t);
  const file = join(dir, 'f.qcow2');
  await createQcow2(file, { size: 4 << 20 });
  const g = new BlockGraph(createRegistry([faultDriver]));
  const logged: string[] = [];
  g.on('error-log', (m: string) => logged.push(m));
  const node = await g.open({
    driver: 'qcow2',
    'node-name': 'fmt',
    file: { driver: 'test-fault', 'node-name': 'faulty', file: { driver: 'file', filename: file } },
  });
  g.createBackend(node);
  await node.write(0, pattern(1, 65536)); // a new L2 table and refcounts, cached and dirty
  faultControl(g.getNode('faulty')).failWrites = 'ENOSPC';
  await assert.rejects(g.closeAll(), (e: unknown) => {
    assert.ok(e instanceof BlockError);
    assert.equal(e.code, 'ENOSPC');
    assert.match(e.message, /^closing fmt: /);
    return true;
  });
  assert.equal(g.nodes.size, 0, 'every node is closed regardless');
  assert.equal(logged.length, 1);
});
