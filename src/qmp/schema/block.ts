// Argument schemas of the block graph commands (QEMU 7.2's qapi/block-core.json members).

import { ANY_DICT, enumOf, listOf, type Fields } from './types.js';

export const BLOCKDEV_DEL: Fields = { 'node-name': 'str' };

export const BLOCK_RESIZE: Fields = { '*device': 'str', '*node-name': 'str', size: 'int' };

export const BLOCKDEV_REOPEN: Fields = { options: listOf(ANY_DICT) };

export const QUERY_NAMED_BLOCK_NODES: Fields = { '*flat': 'bool' };

export const X_BLOCKDEV_CHANGE: Fields = { parent: 'str', '*child': 'str', '*node': 'str' };

export const BLOCK_SET_WRITE_THRESHOLD: Fields = { 'node-name': 'str', 'write-threshold': 'uint64' };

export const ON_ERROR = enumOf('report', 'ignore', 'enospc', 'stop', 'auto');
export const SYNC_MODE = enumOf('top', 'full', 'none', 'incremental', 'bitmap');
const BITMAP_SYNC = enumOf('on-success', 'never', 'always');

export const BLOCKDEV_BACKUP: Fields = {
  '*job-id': 'str',
  device: 'str',
  target: 'str',
  sync: SYNC_MODE,
  '*speed': 'int',
  '*bitmap': 'str',
  '*bitmap-mode': BITMAP_SYNC,
  '*compress': 'bool',
  '*on-source-error': ON_ERROR,
  '*on-target-error': ON_ERROR,
  '*auto-finalize': 'bool',
  '*auto-dismiss': 'bool',
  '*filter-node-name': 'str',
  '*x-perf': { struct: { '*use-copy-range': 'bool', '*max-workers': 'int', '*max-chunk': 'int' } },
};

const MIRROR_COMMON: Fields = {
  '*job-id': 'str',
  device: 'str',
  target: 'str',
  '*replaces': 'str',
  sync: SYNC_MODE,
  '*speed': 'int',
  '*granularity': 'uint64',
  '*buf-size': 'int',
  '*on-source-error': ON_ERROR,
  '*on-target-error': ON_ERROR,
  '*filter-node-name': 'str',
  '*copy-mode': enumOf('background', 'write-blocking'),
  '*auto-finalize': 'bool',
  '*auto-dismiss': 'bool',
};

export const BLOCKDEV_MIRROR: Fields = MIRROR_COMMON;

export const DRIVE_MIRROR: Fields = {
  ...MIRROR_COMMON,
  '*format': 'str',
  '*node-name': 'str',
  '*mode': enumOf('existing', 'absolute-paths'),
  '*unmap': 'bool',
};

export const BLOCK_COMMIT: Fields = {
  '*job-id': 'str',
  device: 'str',
  '*base-node': 'str',
  '*base': 'str',
  '*top-node': 'str',
  '*top': 'str',
  '*backing-file': 'str',
  '*speed': 'int',
  '*on-error': ON_ERROR,
  '*filter-node-name': 'str',
  '*auto-finalize': 'bool',
  '*auto-dismiss': 'bool',
};

/** lockstep's x-blockdev-resync: copy exactly these byte ranges (the pair's resync). */
export const X_BLOCKDEV_RESYNC: Fields = {
  'job-id': 'str',
  device: 'str',
  target: 'str',
  extents: listOf({ struct: { offset: 'int', length: 'int' } }),
  '*speed': 'int',
  '*target-is-zero': 'bool',
  '*on-source-error': ON_ERROR,
  '*on-target-error': ON_ERROR,
  '*auto-finalize': 'bool',
  '*auto-dismiss': 'bool',
};
