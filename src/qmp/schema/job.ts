// Argument schemas of the job verbs (qapi/block-core.json and qapi/job.json).

import type { Fields } from './types.js';

export const BLOCK_JOB_DEVICE = { device: 'str' } as const satisfies Fields;
export const BLOCK_JOB_CANCEL = { device: 'str', '*force': 'bool' } as const satisfies Fields;
export const BLOCK_JOB_SET_SPEED = { device: 'str', speed: 'int' } as const satisfies Fields;
export const JOB_ID = { id: 'str' } as const satisfies Fields;
