// The one place that maps lockstep errors to QMP error classes. QEMU 7.2 uses few classes:
// GenericError for nearly everything (including "Cannot find device='x' nor node-name='x'",
// which QEMU 7.2 reports as a GenericError: so does lockstep for NotFoundError),
// CommandNotFound for unknown commands and for commands before capabilities negotiation,
// DeviceNotFound where QEMU looks a device up by name ("Device 'x' not found": handlers throw
// QmpError explicitly), DeviceNotActive for a block job id that does not exist.

import { BlockError, InvalidArgumentError, NotFoundError, StateError, errorMessage } from '../errors.js';

export type QmpErrorClass = 'GenericError' | 'CommandNotFound' | 'DeviceNotFound' | 'DeviceNotActive' | 'KVMMissingCap';

/** An error with an explicit QMP class; handlers throw it when QEMU's class is not the default. */
export class QmpError extends Error {
  override name = 'QmpError';
  constructor(
    readonly errorClass: QmpErrorClass,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
  static generic(message: string): QmpError {
    return new QmpError('GenericError', message);
  }
}

export interface QmpErrorBody {
  class: QmpErrorClass;
  desc: string;
}

/**
 * Maps anything a handler threw to `{class, desc}`. Unknown errors (a bug) still answer with a
 * GenericError so that one bad command never takes the monitor down; the caller logs them.
 */
export function toQmpError(e: unknown): QmpErrorBody {
  if (e instanceof QmpError) return { class: e.errorClass, desc: e.message };
  if (e instanceof NotFoundError || e instanceof InvalidArgumentError || e instanceof StateError) return { class: 'GenericError', desc: withoutHint(e.message) };
  if (e instanceof BlockError) return { class: 'GenericError', desc: e.message };
  return { class: 'GenericError', desc: errorMessage(e) };
}

/**
 * QEMU appends hints (error_append_hint) for humans, and QMP never carries them: the image
 * lock's "Is another process using the image [...]?" stays on the command line.
 */
function withoutHint(message: string): string {
  return message.replace(/\nIs another process using the image \[[^\n]*\]\?$/, '');
}

/** true when the error is one the monitor expects (not a bug worth a stack trace in the log) */
export function isExpectedError(e: unknown): boolean {
  return (
    e instanceof QmpError ||
    e instanceof NotFoundError ||
    e instanceof InvalidArgumentError ||
    e instanceof StateError ||
    e instanceof BlockError
  );
}
