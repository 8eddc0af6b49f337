import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BlockError, STRERROR, type ErrorCode } from '../../src/errors.js';
import { blockErrorOfNbd, codeOfNbdError, nbdErrorOf } from '../../src/nbd/errno.js';
import { NBD_ERR } from '../../src/nbd/protocol.js';
import { ACCEPTS_REQUESTS, CLIENT_TRANSITIONS, checkTransition, type ClientState } from '../../src/nbd/client/states.js';

test('every BlockError code maps to an NBD error, and NBD errors map back', () => {
  const table: Array<[ErrorCode, number]> = [
    ['EPERM', NBD_ERR.EPERM],
    ['EROFS', NBD_ERR.EPERM],
    ['EACCES', NBD_ERR.EPERM],
    ['EIO', NBD_ERR.EIO],
    ['ENOMEM', NBD_ERR.ENOMEM],
    ['EINVAL', NBD_ERR.EINVAL],
    ['ENOSPC', NBD_ERR.ENOSPC],
    ['EFBIG', NBD_ERR.ENOSPC],
    ['EOVERFLOW', NBD_ERR.EOVERFLOW],
    ['ENOTSUP', NBD_ERR.ENOTSUP],
    ['ESHUTDOWN', NBD_ERR.ESHUTDOWN],
    ['ECANCELED', NBD_ERR.EIO],
    ['EBUSY', NBD_ERR.EIO],
    ['ENOENT', NBD_ERR.EIO],
    ['EAGAIN', NBD_ERR.EIO],
    ['ENOMEDIUM', NBD_ERR.EIO],
  ];
  assert.deepEqual(new Set(table.map(([c]) => c)), new Set(Object.keys(STRERROR)), 'the table covers every code');
  for (const [code, nbd] of table) assert.equal(nbdErrorOf(new BlockError(code)), nbd, code);
  assert.equal(nbdErrorOf(new Error('not a BlockError')), NBD_ERR.EIO);
  for (const [name, nbd] of Object.entries(NBD_ERR)) assert.equal(codeOfNbdError(nbd), name);
  assert.equal(codeOfNbdError(4242), 'EINVAL', 'unknown NBD errors count as EINVAL (proto.md)');
  const e = blockErrorOfNbd(NBD_ERR.ENOSPC, 'disk full');
  assert.equal(e.code, 'ENOSPC');
  assert.match(e.message, /disk full/);
});

test('client connection states: the transition table is enforced', () => {
  const states = Object.keys(CLIENT_TRANSITIONS) as ClientState[];
  for (const from of states) {
    for (const to of states) {
      const legal = CLIENT_TRANSITIONS[from].includes(to);
      if (legal) assert.doesNotThrow(() => checkTransition(from, to));
      else assert.throws(() => checkTransition(from, to), /illegal transition/);
    }
  }
  assert.deepEqual(
    states.filter((s) => ACCEPTS_REQUESTS[s]),
    ['ready'],
  );
  assert.deepEqual(CLIENT_TRANSITIONS.closed, []);
});
