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

/** glibc's strerror() texts: lockstep's codes and the other errors host file calls meet. */
const HOST_STRERROR: Readonly<Record<string, string>> = {
  ...STRERROR,
  EISDIR: 'Is a directory',
  ENOTDIR: 'Not a directory',
  EEXIST: 'File exists',
  ELOOP: 'Too many levels of symbolic links',
  ENAMETOOLONG: 'File name too long',
  EMFILE: 'Too many open files',
  ENFILE: 'Too many open files in system',
  EDQUOT: 'Disk quota exceeded',
  ETXTBSY: 'Text file busy',
  ENXIO: 'No such device or address',
};

export function isErrorCode(code: unknown): code is ErrorCode {
  return typeof code === 'string' && Object.hasOwn(STRERROR, code);
}

/** The strerror() text of an errno name ('ENOENT'), or undefined for a name lockstep lacks. */
export function strerrorOf(code: unknown): string | undefined {
  return typeof code === 'string' && Object.hasOwn(HOST_STRERROR, code) ? HOST_STRERROR[code] : undefined;
}

/**
 * The text QEMU prints for an error ("Could not open 'x': <this>"): a BlockError's strerror,
 * a Node system error's strerror by its code, else the error's own message.
 */
export function strerror(e: unknown): string {
  if (e instanceof BlockError) return STRERROR[e.code];
  return strerrorOf((e as { code?: unknown } | null)?.code) ?? errorMessage(e);
}

/** The errno-like code of a Node system error where lockstep has it, else EIO. */
export function errorCodeOf(e: unknown): ErrorCode {
  const code = (e as { code?: unknown } | null)?.code;
  return isErrorCode(code) ? code : 'EIO';
}

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
    const known = errorCodeOf(err);
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
