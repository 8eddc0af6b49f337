// Two error channels, on purpose: BlockError (errno-like codes) on the data path, and
// precise human messages on the control path (InvalidArgumentError, StateError,
// NotFoundError). qmp/errors.ts and nbd/errno.ts are the only places that map them to wire
// errors.

export type ErrorCode =
  | 'EIO'
  | 'EINVAL'
  | 'ENOSPC'
  | 'EPERM'
  | 'EROFS'
  | 'ENOTSUP'
  | 'EOVERFLOW'
  | 'ESHUTDOWN'
  | 'EACCES'
  | 'EBUSY'
  | 'ENOENT'
  | 'ECANCELED'
  | 'EAGAIN'
  | 'ENOMEM'
  | 'EFBIG'
  | 'ENOMEDIUM';

/** strerror() texts, as QEMU prints them ("Failed to empty x: Input/output error"). */
export const STRERROR: Record<ErrorCode, string> = {
  EIO: 'Input/output error',
  EINVAL: 'Invalid argument',
  ENOSPC: 'No space left on device',
  EPERM: 'Operation not permitted',
  EROFS: 'Read-only file system',
  ENOTSUP: 'Operation not supported',
  EOVERFLOW: 'Value too large for defined data type',
  ESHUTDOWN: 'Cannot send after transport endpoint shutdown',
  EACCES: 'Permission denied',
  EBUSY: 'Device or resource busy',
  ENOENT: 'No such file or directory',
  ECANCELED: 'Operation canceled',
  EAGAIN: 'Resource temporarily unavailable',
  ENOMEM: 'Cannot allocate memory',
  EFBIG: 'File too large',
  ENOMEDIUM: 'No medium found',
};

/** Linux errno numbers, for the few places that print or transmit them. */
export const ERRNO: Record<ErrorCode, number> = {
  EPERM: 1,
  ENOENT: 2,
  EIO: 5,
  EAGAIN: 11,
  ENOMEM: 12,
  EACCES: 13,
  EBUSY: 16,
  EINVAL: 22,
  EFBIG: 27,
  ENOSPC: 28,
  EROFS: 30,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
  ENOMEDIUM: 123,
  ECANCELED: 125,
  EOVERFLOW: 75,
};

export class BlockError extends Error {
  override name = 'BlockError';
  constructor(
    readonly code: ErrorCode,
    message?: string,
    options?: { cause?: unknown },
  ) {
    super(message ?? STRERROR[code], options);
  }
  static io(message?: string, cause?: unknown): BlockError {
    return new BlockError('EIO', message, { cause });
  }
  static inval(message?: string): BlockError {
    return new BlockError('EINVAL', message);
  }
  static notsup(message?: string): BlockError {
    return new BlockError('ENOTSUP', message);
  }
  static perm(message?: string): BlockError {
    return new BlockError('EPERM', message);
  }
  static rofs(message?: string): BlockError {
    return new BlockError('EROFS', message);
  }
  static canceled(message?: string): BlockError {
    return new BlockError('ECANCELED', message);
  }
  /** Wraps a Node system error (err.code 'ENOSPC' etc.) keeping its code where known. */
  static fromSystem(err: unknown, context?: string): BlockError {
    if (err instanceof BlockError) return err;
    const code = (err as { code?: unknown } | null)?.code;
    const known = typeof code === 'string' && code in STRERROR ? (code as ErrorCode) : 'EIO';
    const msg = context ? `${context}: ${STRERROR[known]}` : STRERROR[known];
    return new BlockError(known, msg, { cause: err });
  }
}

/** Control path: bad options, bad arguments. Maps to QMP GenericError. */
export class InvalidArgumentError extends Error {
  override name = 'InvalidArgumentError';
}

/** Control path: operation not allowed in the current state. Maps to QMP GenericError. */
export class StateError extends Error {
  override name = 'StateError';
}

/** Control path: a named node, device, job or export does not exist (QMP DeviceNotFound). */
export class NotFoundError extends Error {
  override name = 'NotFoundError';
}

export function isBlockError(e: unknown, code?: ErrorCode): e is BlockError {
  return e instanceof BlockError && (code === undefined || e.code === code);
}

/** An invariant violated: a bug, never a user error. */
export function assert(cond: unknown, message = 'assertion failed'): asserts cond {
  if (!cond) throw new Error(`internal error: ${message}`);
}

export function errorMessage(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
