// drive-mirror's target string: NBD filenames are read by the one NBD filename parser
// (src/nbd/uri.ts) that qemu-img and qemu-io names use; files stay files; other URIs keep
// drive-mirror's refusal.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { driveTargetOptions } from '../../src/qmp/commands/jobs.js';
import { InvalidArgumentError } from '../../src/errors.js';

const UNSUPPORTED = (uri: string): string =>
  `Unsupported target URI '${uri}' (nbd://HOST:PORT/EXPORT, nbd+unix:///EXPORT?socket=PATH or a file name)`;

test('an nbd:// target names a TCP server, its port (10809 when absent, a string as QEMU keeps it) and export', () => {
  assert.deepEqual(driveTargetOptions('nbd://127.0.0.1:10810/disk%200', undefined, 'tgt'), {
    driver: 'raw',
    file: { driver: 'nbd', server: { type: 'inet', host: '127.0.0.1', port: '10810' }, export: 'disk 0' },
    'node-name': 'tgt',
  });
  assert.deepEqual(driveTargetOptions('nbd://[::1]/x', 'qcow2', undefined), {
    driver: 'qcow2',
    file: { driver: 'nbd', server: { type: 'inet', host: '::1', port: '10809' }, export: 'x' },
  });
  assert.deepEqual(driveTargetOptions('nbd://example.org', undefined, undefined).file, {
    driver: 'nbd',
    server: { type: 'inet', host: 'example.org', port: '10809' },
    export: '',
  });
});

test('an nbd+unix target names a socket path and export; the legacy nbd: syntax is NBD too, as in QEMU', () => {
  assert.deepEqual(driveTargetOptions('nbd+unix:///disk0?socket=/run/lockstep/nbd.sock', undefined, undefined).file, {
    driver: 'nbd',
    server: { type: 'unix', path: '/run/lockstep/nbd.sock' },
    export: 'disk0',
  });
  assert.deepEqual(driveTargetOptions('nbd:unix:/tmp/s.sock:exportname=d', undefined, undefined).file, {
    driver: 'nbd',
    server: { type: 'unix', path: '/tmp/s.sock' },
    export: 'd',
  });
});

test('a file name stays a file; other URIs, TLS ones included, keep drive-mirror\'s message', () => {
  assert.deepEqual(driveTargetOptions('/var/lib/t.raw', undefined, undefined).file, { driver: 'file', filename: '/var/lib/t.raw' });
  for (const uri of ['http://example.org/t.raw', 'nbds://127.0.0.1/x', 'nbds+unix:///x?socket=/s']) {
    assert.throws(
      () => driveTargetOptions(uri, undefined, undefined),
      (e: unknown) => e instanceof InvalidArgumentError && e.message === UNSUPPORTED(uri),
    );
  }
  assert.throws(() => driveTargetOptions('nbd+unix:///x', undefined, undefined), /nbd\+unix needs \?socket=PATH/);
});
