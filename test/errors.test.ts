// The one strerror lookup (src/errors.ts) every "Could not open 'x': <reason>" message uses.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BlockError, errorCodeOf, isErrorCode, strerror, strerrorOf } from '../src/errors.js';

function systemError(code: string, message: string): Error {
  return Object.assign(new Error(message), { code });
}

test('strerror: a BlockError by its code, a system error by its errno name, else the message', () => {
  assert.equal(strerror(new BlockError('ENOSPC', 'qcow2: out of clusters')), 'No space left on device');
  assert.equal(strerror(systemError('ENOENT', "ENOENT: no such file or directory, open 'x'")), 'No such file or directory');
  // host errors beyond lockstep's codes keep glibc's text
  assert.equal(strerror(systemError('EISDIR', 'EISDIR: illegal operation on a directory')), 'Is a directory');
  assert.equal(strerror(systemError('EWHATEVER', 'something odd')), 'something odd');
  assert.equal(strerror(new Error('plain')), 'plain');
  assert.equal(strerror('a string'), 'a string');
  // names that are properties of every object are no errno names
  assert.equal(strerrorOf('toString'), undefined);
  assert.equal(strerrorOf('EACCES'), 'Permission denied');
  assert.equal(strerrorOf(undefined), undefined);
});

test('errorCodeOf keeps a system error code lockstep has, else EIO', () => {
  assert.equal(errorCodeOf(systemError('ENOSPC', 'full')), 'ENOSPC');
  assert.equal(errorCodeOf(systemError('EISDIR', 'dir')), 'EIO');
  assert.equal(errorCodeOf(null), 'EIO');
  assert.equal(isErrorCode('EROFS'), true);
  assert.equal(isErrorCode('constructor'), false);
  assert.equal(BlockError.fromSystem(systemError('EACCES', 'denied'), 'Could not open x').message, 'Could not open x: Permission denied');
});
