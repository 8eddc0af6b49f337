// Argument schemas of the block graph commands (QEMU 7.2's qapi/block-core.json members).

import { ANY_DICT, enumOf, listOf, type Fields } from './types.js';

export const BLOCKDEV_DEL = { 'node-name': 'str' } as const satisfies Fields;

export const BLOCK_RESIZE = { '*device': 'str', '*node-name': 'str', size: 'int' } as const satisfies Fields;

export const BLOCKDEV_REOPEN = { options: listOf(ANY_DICT) } as const satisfies Fields;

export const QUERY_NAMED_BLOCK_NODES = { '*flat': 'bool' } as const satisfies Fields;

export const X_BLOCKDEV_CHANGE = { parent: 'str', '*child': 'str', '*node': 'str' } as const satisfies Fields;

export const BLOCK_SET_WRITE_THRESHOLD = { 'node-name': 'str', 'write-threshold': 'uint64' } as const satisfies Fields;

export const ON_ERROR = enumOf('report', 'ignore', 'enospc', 'stop', 'auto');
export const SYNC_MODE = enumOf('top', 'full', 'none', 'incremental', 'bitmap');
const BITMAP_SYNC = enumOf('on-success', 'never', 'always');

export const BLOCKDEV_BACKUP = {
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
} as const satisfies Fields;

const MIRROR_COMMON = {
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
} as const satisfies Fields;

export const BLOCKDEV_MIRROR = MIRROR_COMMON satisfies Fields;

export const DRIVE_MIRROR = {
  ...MIRROR_COMMON,
  '*format': 'str',
  '*node-name': 'str',
  '*mode': enumOf('existing', 'absolute-paths'),
  '*unmap': 'bool',
} as const satisfies Fields;

export const BLOCK_COMMIT = {
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
} as const satisfies Fields;

/** lockstep's x-blockdev-resync: copy exactly these byte ranges (the pair's resync). */
export const X_BLOCKDEV_RESYNC = {
  'job-id': 'str',
  device: 'str',
  target: 'str',
  extents: listOf({ struct: { offset: 'int', length: 'int' } }),
  '*speed': 'int',
  '*target-is-zero': 'bool',
  '*flush-bytes': 'int',
  '*on-source-error': ON_ERROR,
  '*on-target-error': ON_ERROR,
  '*auto-finalize': 'bool',
  '*auto-dismiss': 'bool',
} as const satisfies Fields;
