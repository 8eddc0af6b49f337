import { test } from 'node:test';
import assert from 'node:assert/strict';
import { InvalidArgumentError } from '../../src/errors.js';
import { nbdFilenameOptions } from '../../src/nbd/uri.js';

function rejects(fn: () => unknown, message: string): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof InvalidArgumentError, `expected InvalidArgumentError, got ${String(e)}`);
    assert.equal(e.message, message);
    return true;
  });
}

test('NBD filenames: URIs and the legacy syntax become nbd protocol options', () => {
  assert.deepEqual(nbdFilenameOptions('nbd://localhost/disk0'), {
    driver: 'nbd',
    server: { type: 'inet', host: 'localhost', port: '10809' },
    export: 'disk0',
  });
  assert.deepEqual(nbdFilenameOptions('nbd+tcp://127.0.0.1:10810'), {
    driver: 'nbd',
    server: { type: 'inet', host: '127.0.0.1', port: '10810' },
    export: '',
  });
  assert.deepEqual(nbdFilenameOptions('nbd://[::1]:10811/a%20b'), {
    driver: 'nbd',
    server: { type: 'inet', host: '::1', port: '10811' },
    export: 'a b',
  });
  assert.deepEqual(nbdFilenameOptions('nbd+unix:///exp?socket=/tmp/s.sock'), {
    driver: 'nbd',
    server: { type: 'unix', path: '/tmp/s.sock' },
    export: 'exp',
  });
  assert.deepEqual(nbdFilenameOptions('nbd:unix:/tmp/s.sock:exportname=e1'), {
    driver: 'nbd',
    server: { type: 'unix', path: '/tmp/s.sock' },
    export: 'e1',
  });
  assert.deepEqual(nbdFilenameOptions('nbd:localhost:10809'), {
    driver: 'nbd',
    server: { type: 'inet', host: 'localhost', port: '10809' },
    export: '',
  });
  assert.equal(nbdFilenameOptions('a.img'), null);
  assert.equal(nbdFilenameOptions('/tmp/nbd.img'), null);
  rejects(() => nbdFilenameOptions('nbd+unix:///exp'), "NBD URI 'nbd+unix:///exp': nbd+unix needs ?socket=PATH");
  rejects(() => nbdFilenameOptions('nbds://localhost/x'), 'NBD over TLS (nbds://) needs --image-opts with tls-creds');
  rejects(() => nbdFilenameOptions('nbd:nonsense'), "Invalid NBD filename 'nbd:nonsense'");
  rejects(() => nbdFilenameOptions('nbd+ssh://h/x'), "Unknown NBD URI scheme 'nbd+ssh'");
});
