// libnbd and QEMU tools against lockstep's NBD server.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { requireTools, run } from './tools.js';
import { patterned, serveMemory } from '../nbd/helpers.js';
import { makeCerts } from '../nbd/tls-certs.js';
import { tempDir } from '../helpers/graph.js';
import { loadTlsCreds, serverTlsConfig } from '../../src/nbd/tls.js';

const MiB = 1 << 20;

test('nbdinfo: size, --list and --map', async (t) => {
  if (!requireTools(t, 'nbdinfo')) return;
  const s = await serveMemory(t, { size: 64 * MiB });
  s.server.addExport({ name: 'second', node: 'disk', description: 'same disk, read-only' });
  await s.node.write(8 * MiB, patterned(MiB, 3));
  const uri = `nbd://127.0.0.1:${s.tcp.port}/disk0`;
  const info = JSON.parse((await run('nbdinfo', ['--json', uri])).stdout);
  assert.equal(info.exports[0]['export-size'], 64 * MiB);
  assert.equal(info.exports[0]['is_read_only'], false);
  assert.equal(info.exports[0]['can_flush'], true);
  assert.equal(info.exports[0]['can_zero'], true);
  const ro = JSON.parse((await run('nbdinfo', ['--json', `nbd://127.0.0.1:${s.tcp.port}/second`])).stdout);
  assert.equal(ro.exports[0]['is_read_only'], true);
  assert.equal(ro.exports[0]['can_multi_conn'], true);

  const list = JSON.parse((await run('nbdinfo', ['--json', '--list', `nbd+unix:///?socket=${s.unix.path}`])).stdout);
  assert.deepEqual(
    list.exports.map((e: { 'export-name': string; description?: string }) => [e['export-name'], e.description]),
    [
      ['disk0', 'test disk'],
      ['second', 'same disk, read-only'],
    ],
  );

  const map = JSON.parse((await run('nbdinfo', ['--json', '--map', uri])).stdout) as Array<{ offset: number; length: number; type: number }>;
  assert.deepEqual(
    map.map((e) => [e.offset, e.length, e.type]),
    [
      [0, 8 * MiB, 3],
      [8 * MiB, MiB, 0],
      [9 * MiB, 55 * MiB, 3],
    ],
  );
});

test('nbdcopy into and out of a lockstep export, TCP and Unix', async (t) => {
  if (!requireTools(t, 'nbdcopy')) return;
  const s = await serveMemory(t, { size: 32 * MiB });
  const src = join(s.dir, 'src.img');
  const data = patterned(32 * MiB, 77);
  data.fill(0, 4 * MiB, 12 * MiB); // a zero run nbdcopy may send as write-zeroes
  writeFileSync(src, data);
  await run('nbdcopy', [src, `nbd://127.0.0.1:${s.tcp.port}/disk0`]);
  assert.ok((await s.node.read(0, 32 * MiB)).equals(data));
  const out = join(s.dir, 'out.img');
  await run('nbdcopy', [`nbd+unix:///disk0?socket=${s.unix.path}`, out]);
  assert.ok(readFileSync(out).equals(data));
});

test('qemu-img info, convert, compare and qemu-io on nbd:// and nbd+unix:// URIs', async (t) => {
  if (!requireTools(t, 'qemu-img', 'qemu-io')) return;
  const s = await serveMemory(t, { size: 16 * MiB });
  const tcp = `nbd://127.0.0.1:${s.tcp.port}/disk0`;
  const unix = `nbd+unix:///disk0?socket=${s.unix.path}`;
  const info = JSON.parse((await run('qemu-img', ['info', '--output=json', tcp])).stdout);
  assert.equal(info['virtual-size'], 16 * MiB);

  const src = join(s.dir, 'src.raw');
  const data = patterned(16 * MiB, 5);
  data.fill(0, 0, 2 * MiB);
  writeFileSync(src, data);
  await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, unix]);
  assert.ok((await s.node.read(0, 16 * MiB)).equals(data));
  await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, tcp]);
  const back = join(s.dir, 'back.raw');
  await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', tcp, back]);
  assert.ok(readFileSync(back).equals(data));

  const io = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xab 1M 64k', '-c', 'read -P 0xab 1M 64k', '-c', 'write -z 3M 1M', '-c', 'read -P 0 3M 1M', '-c', 'discard 5M 64k', '-c', 'flush', unix]);
  assert.doesNotMatch(io.stdout + io.stderr, /Pattern verification failed|error/i);
  const expected = Buffer.from(data);
  expected.fill(0xab, MiB, MiB + 65536);
  expected.fill(0, 3 * MiB, 4 * MiB);
  expected.fill(0, 5 * MiB, 5 * MiB + 65536);
  assert.ok((await s.node.read(0, 16 * MiB)).equals(expected));
  // a mismatch must be noticed: compare against the original now fails
  await assert.rejects(run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, tcp]), /compare/);
});

test('qemu-img over TLS (tls-creds-x509) against lockstep\'s server', async (t) => {
  if (!requireTools(t, 'qemu-img', 'openssl')) return;
  const { serverDir, clientDir } = makeCerts(tempDir(t, 'lockstep-tls-interop-'));
  const s = await serveMemory(t, {
    size: 4 * MiB,
    server: { tls: serverTlsConfig(loadTlsCreds({ id: 's', endpoint: 'server', dir: serverDir, verifyPeer: true })) },
  });
  await s.node.write(MiB, patterned(MiB, 31));
  const obj = `tls-creds-x509,id=tls0,dir=${clientDir},endpoint=client`;
  const opts = `driver=nbd,host=127.0.0.1,port=${s.tcp.port},export=disk0,tls-creds=tls0`;
  const info = JSON.parse((await run('qemu-img', ['info', '--output=json', '--object', obj, '--image-opts', opts])).stdout);
  assert.equal(info['virtual-size'], 4 * MiB);
  const out = join(s.dir, 'out.raw');
  await run('qemu-img', ['convert', '--object', obj, '--image-opts', opts, '-O', 'raw', out]);
  assert.ok(readFileSync(out).equals(await s.node.read(0, 4 * MiB)));
  // without TLS, QEMU cannot reach the export
  await assert.rejects(run('qemu-img', ['info', `nbd://127.0.0.1:${s.tcp.port}/disk0`]), /TLS|tls/);
});
