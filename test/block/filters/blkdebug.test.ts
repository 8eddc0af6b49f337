import { test } from 'node:test';
import assert from 'node:assert/strict';
import { newGraph, pattern } from '../../helpers/graph.js';
import { BlockError } from '../../../src/errors.js';

const isCode = (code: string) => (e: unknown) => e instanceof BlockError && e.code === code;

test('keyval form: inject-error.0.event=write_aio,inject-error.0.errno=5 fails writes with EIO', async () => {
  const g = newGraph();
  // what keyval parsing of "driver=blkdebug,image.driver=memory,image.size=1M,
  // inject-error.0.event=write_aio,inject-error.0.errno=5,inject-error.0.iotype=write" gives
  const n = await g.open(
    {
      driver: 'blkdebug',
      image: { driver: 'memory', size: '1M' },
      'inject-error': { '0': { event: 'write_aio', errno: '5', iotype: 'write' } },
    },
    { keyval: true },
  );
  assert.ok((await n.read(0, 512)).equals(Buffer.alloc(512)), 'reads work');
  await assert.rejects(n.write(0, pattern(1, 512)), isCode('EIO'));
  await assert.rejects(n.write(4096, pattern(1, 512)), isCode('EIO'), 'without once, every write fails');
  assert.ok((await n.read(0, 512)).equals(Buffer.alloc(512)), 'iotype=write spares reads');
  assert.ok((await n.file!.read(0, 512)).equals(Buffer.alloc(512)), 'the image is unchanged');
});

test('JSON form: once, sector and errno numbers as QEMU', async () => {
  const g = newGraph();
  const n = await g.open({
    driver: 'blkdebug',
    image: { driver: 'memory', size: 1 << 20 },
    'inject-error': [
      { event: 'write_aio', errno: 28, sector: 8, once: true, iotype: 'write' },
      { event: 'read_aio', errno: 1, once: true, immediately: true, iotype: 'read' },
    ],
  });
  await n.write(0, pattern(1, 4096)); // sector 8 = byte 4096: not covered
  await assert.rejects(n.write(4000, pattern(2, 200)), isCode('ENOSPC'));
  await n.write(4000, pattern(2, 200)); // once: gone
  await assert.rejects(n.read(0, 10), isCode('EPERM'));
  assert.ok((await n.read(4000, 200)).equals(pattern(2, 200)));
});

test('state and set-state: a rule fires only in its state', async () => {
  const g = newGraph();
  const n = await g.open({
    driver: 'blkdebug',
    image: { driver: 'memory', size: 1 << 20 },
    'inject-error': [{ event: 'write_aio', state: 2, errno: 5, iotype: 'write' }],
    'set-state': [{ event: 'flush_to_disk', state: 1, new_state: 2 }],
  });
  await n.write(0, pattern(1, 512)); // state 1: no error
  await n.flush(); // -> state 2
  assert.equal(n.impl.info?.()['state'], 2);
  await assert.rejects(n.write(0, pattern(1, 512)), isCode('EIO'));
});

test('event none activates at open; align and max-transfer shape requests', async () => {
  const g = newGraph();
  const n = await g.open({
    driver: 'blkdebug',
    image: { driver: 'memory', size: 1 << 20 },
    align: 4096,
    'max-transfer': 65536,
    'inject-error': [{ event: 'none', iotype: 'discard', errno: 95 }],
  });
  assert.equal(n.caps.requestAlignment, 4096);
  assert.equal(n.caps.maxTransfer, 65536);
  assert.equal(n.caps.growable, true, 'growable like its image, so a format above can append');
  await assert.rejects(n.discard(0, 65536), isCode('ENOTSUP'));
  await n.write(100, pattern(3, 200_000)); // unaligned and larger than max-transfer
  assert.ok((await n.read(100, 200_000)).equals(pattern(3, 200_000)));
});

test('bad blkdebug options are refused with clear messages', async () => {
  const g = newGraph();
  const img = { driver: 'memory', size: 1 << 20 };
  await assert.rejects(g.open({ driver: 'blkdebug', image: img, config: '/tmp/x.conf' }), { message: /Parameter 'config' is not supported/ });
  await assert.rejects(g.open({ driver: 'blkdebug' }), { message: "Parameter 'image' is missing" });
  await assert.rejects(g.open({ driver: 'blkdebug', image: img, 'inject-error': [{ event: 'bogus' }] }), {
    message: "Parameter 'inject-error.0.event' does not accept value 'bogus'",
  });
  await assert.rejects(g.open({ driver: 'blkdebug', image: img, 'inject-error': [{ errno: 5 }] }), {
    message: "Parameter 'inject-error.0.event' is missing",
  });
  await assert.rejects(g.open({ driver: 'blkdebug', image: img, 'inject-error': { '1': { event: 'none' } } }, { keyval: true }), {
    message: "Parameter 'inject-error.0' is missing",
  });
  await assert.rejects(g.open({ driver: 'blkdebug', image: img, align: 3 }), { message: 'Cannot meet constraints with align 3' });
  await assert.rejects(g.open({ driver: 'blkdebug', image: img, 'set-state': [{ event: 'none' }] }), {
    message: "Parameter 'set-state.0.new_state' is missing",
  });
  assert.equal(g.nodes.size, 0, 'nothing left open');
});
