// NBD wire constants (doc/proto.md of NetworkBlockDevice/nbd). Names follow the spec with
// the NBD_ prefix dropped; everything else in src/nbd speaks in these names.

export const NBDMAGIC = 0x4e42444d41474943n;
export const IHAVEOPT = 0x49484156454f5054n;
export const OPTION_REPLY_MAGIC = 0x3e889045565a9n;

export const REQUEST_MAGIC = 0x25609513;
export const EXTENDED_REQUEST_MAGIC = 0x21e41c71;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;
export const EXTENDED_REPLY_MAGIC = 0x6e8a278c;

/** handshake flags (server) */
export const FLAG_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_NO_ZEROES = 1 << 1;
/** client flags */
export const FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_C_NO_ZEROES = 1 << 1;

/** transmission flags */
export const TFLAG = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
  BLOCK_STAT_PAYLOAD: 1 << 12,
} as const;

export const OPT = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  PEEK_EXPORT: 4,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

export const REP_ERR_BIT = 0x80000000;
export const REP = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: REP_ERR_BIT + 1,
  ERR_POLICY: REP_ERR_BIT + 2,
  ERR_INVALID: REP_ERR_BIT + 3,
  ERR_PLATFORM: REP_ERR_BIT + 4,
  ERR_TLS_REQD: REP_ERR_BIT + 5,
  ERR_UNKNOWN: REP_ERR_BIT + 6,
  ERR_SHUTDOWN: REP_ERR_BIT + 7,
  ERR_BLOCK_SIZE_REQD: REP_ERR_BIT + 8,
  ERR_TOO_BIG: REP_ERR_BIT + 9,
  ERR_EXT_HEADER_REQD: REP_ERR_BIT + 10,
} as const;

export const INFO = {
  EXPORT: 0,
  NAME: 1,
  DESCRIPTION: 2,
  BLOCK_SIZE: 3,
} as const;

export const CMD = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
  RESIZE: 8,
} as const;

export const CMD_FLAG = {
  FUA: 1 << 0,
  NO_HOLE: 1 << 1,
  DF: 1 << 2,
  REQ_ONE: 1 << 3,
  FAST_ZERO: 1 << 4,
  PAYLOAD_LEN: 1 << 5,
} as const;

export const REPLY_FLAG_DONE = 1 << 0;

export const REPLY_TYPE = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  BLOCK_STATUS_EXT: 6,
  ERROR: (1 << 15) | 1,
  ERROR_OFFSET: (1 << 15) | 2,
} as const;

/** NBD error numbers (the wire values; not the host's errno) */
export const NBD_ERR = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

/** base:allocation flags */
export const STATE_HOLE = 1 << 0;
export const STATE_ZERO = 1 << 1;

export const META_BASE_ALLOCATION = 'base:allocation';

/** Largest payload (write data, read reply) we send or accept: QEMU's and nbdkit's limit. */
export const MAX_PAYLOAD = 32 * 1024 * 1024;
/** Longest string (export name, description, message) the spec allows. */
export const MAX_STRING = 4096;
/** Largest option payload the server reads before dropping the connection. */
export const MAX_OPTION_LENGTH = 64 * 1024;

export const REQUEST_HEADER_LENGTH = 28;
export const EXTENDED_REQUEST_HEADER_LENGTH = 32;
export const SIMPLE_REPLY_LENGTH = 16;
export const STRUCTURED_REPLY_HEADER_LENGTH = 20;
export const EXTENDED_REPLY_HEADER_LENGTH = 32;

export function commandName(type: number): string {
  for (const [k, v] of Object.entries(CMD)) if (v === type) return `NBD_CMD_${k}`;
  return `NBD_CMD_(${type})`;
}

export function optionName(opt: number): string {
  for (const [k, v] of Object.entries(OPT)) if (v === opt) return `NBD_OPT_${k}`;
  return `NBD_OPT_(${opt})`;
}
