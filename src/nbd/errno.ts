// The one place where BlockError codes and NBD error numbers meet, both ways.

import { BlockError, type ErrorCode } from '../errors.js';
import { NBD_ERR } from './protocol.js';

/** Server side: the NBD error to send for a failure of a request. */
export function nbdErrorOf(e: unknown): number {
  if (!(e instanceof BlockError)) return NBD_ERR.EIO;
  return NBD_ERROR_OF_CODE[e.code];
}

const NBD_ERROR_OF_CODE: Record<ErrorCode, number> = {
  EPERM: NBD_ERR.EPERM,
  EROFS: NBD_ERR.EPERM,
  EACCES: NBD_ERR.EPERM,
  EIO: NBD_ERR.EIO,
  ENOMEM: NBD_ERR.ENOMEM,
  EINVAL: NBD_ERR.EINVAL,
  ENOSPC: NBD_ERR.ENOSPC,
  EFBIG: NBD_ERR.ENOSPC,
  EOVERFLOW: NBD_ERR.EOVERFLOW,
  ENOTSUP: NBD_ERR.ENOTSUP,
  ESHUTDOWN: NBD_ERR.ESHUTDOWN,
  ECANCELED: NBD_ERR.EIO,
  EBUSY: NBD_ERR.EIO,
  ENOENT: NBD_ERR.EIO,
  EAGAIN: NBD_ERR.EIO,
  ENOMEDIUM: NBD_ERR.EIO,
};

const CODE_OF_NBD_ERROR = new Map<number, ErrorCode>([
  [NBD_ERR.EPERM, 'EPERM'],
  [NBD_ERR.EIO, 'EIO'],
  [NBD_ERR.ENOMEM, 'ENOMEM'],
  [NBD_ERR.EINVAL, 'EINVAL'],
  [NBD_ERR.ENOSPC, 'ENOSPC'],
  [NBD_ERR.EOVERFLOW, 'EOVERFLOW'],
  [NBD_ERR.ENOTSUP, 'ENOTSUP'],
  [NBD_ERR.ESHUTDOWN, 'ESHUTDOWN'],
]);

/** Client side: the BlockError code for an NBD error (unknown values count as EINVAL, per proto.md). */
export function codeOfNbdError(err: number): ErrorCode {
  return CODE_OF_NBD_ERROR.get(err) ?? 'EINVAL';
}

export function blockErrorOfNbd(err: number, message?: string): BlockError {
  const code = codeOfNbdError(err);
  return new BlockError(code, message ? `NBD server: ${message}` : undefined);
}
