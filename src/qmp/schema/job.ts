// Argument schemas of the job verbs (qapi/block-core.json and qapi/job.json).

import type { Fields } from './types.js';

export const BLOCK_JOB_DEVICE: Fields = { device: 'str' };
export const BLOCK_JOB_CANCEL: Fields = { device: 'str', '*force': 'bool' };
export const BLOCK_JOB_SET_SPEED: Fields = { device: 'str', speed: 'int' };
export const JOB_ID: Fields = { id: 'str' };
