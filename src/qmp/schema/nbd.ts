// Argument schemas of the NBD server and block export commands (qapi/block-export.json,
// qapi/sockets.json). nbd-server-start takes the legacy address form
// ({type, data: {...}}); --nbd-server and block-export-add the flat one.

import { enumOf, listOf, struct, type Fields, type TypeSpec } from './types.js';

const INET = {
  host: 'str',
  port: 'str',
  '*numeric': 'bool',
  '*to': 'uint64',
  '*ipv4': 'bool',
  '*ipv6': 'bool',
  '*keep-alive': 'bool',
  '*mptcp': 'bool',
} as const satisfies Fields;
const UNIX = { path: 'str', '*abstract': 'bool', '*tight': 'bool' } as const satisfies Fields;
const VSOCK = { cid: 'str', port: 'str' } as const satisfies Fields;
const FD = { str: 'str' } as const satisfies Fields;

/** SocketAddressLegacy: {type, data: {...}} */
export const SOCKET_ADDRESS_LEGACY = {
  union: {
    base: { type: enumOf('inet', 'unix', 'vsock', 'fd') },
    discriminator: 'type',
    branches: { inet: { data: struct(INET) }, unix: { data: struct(UNIX) }, vsock: { data: struct(VSOCK) }, fd: { data: struct(FD) } },
  },
} as const satisfies TypeSpec;

/** SocketAddress: flat {type, host, port} / {type, path} */
export const SOCKET_ADDRESS = {
  union: { base: { type: enumOf('inet', 'unix', 'vsock', 'fd') }, discriminator: 'type', branches: { inet: INET, unix: UNIX, vsock: VSOCK, fd: FD } },
} as const satisfies TypeSpec;

export const NBD_SERVER_START = {
  addr: SOCKET_ADDRESS_LEGACY,
  '*tls-creds': 'str',
  '*tls-authz': 'str',
  '*max-connections': 'uint64',
  // lockstep extension: seconds a client at the cap may idle before a newcomer replaces it
  '*x-idle-timeout': 'number',
} as const satisfies Fields;

/** --nbd-server (NbdServerOptions) */
export const NBD_SERVER_OPTIONS = {
  addr: SOCKET_ADDRESS,
  '*tls-creds': 'str',
  '*tls-authz': 'str',
  '*max-connections': 'uint64',
  // lockstep extension: seconds a client at the cap may idle before a newcomer replaces it
  '*x-idle-timeout': 'number',
} as const satisfies Fields;

export const NBD_SERVER_ADD = {
  device: 'str',
  '*name': 'str',
  '*description': 'str',
  '*writable': 'bool',
  '*bitmap': 'str',
} as const satisfies Fields;

export const NBD_SERVER_REMOVE = { name: 'str', '*mode': enumOf('safe', 'hard') } as const satisfies Fields;

const EXPORT_BASE = {
  type: enumOf('nbd', 'vhost-user-blk', 'fuse', 'vduse-blk'),
  id: 'str',
  '*fixed-iothread': 'bool',
  '*iothread': 'str',
  'node-name': 'str',
  '*writable': 'bool',
  '*writethrough': 'bool',
} as const satisfies Fields;

export const BLOCK_EXPORT_ADD = {
  union: {
    base: EXPORT_BASE,
    discriminator: 'type',
    branches: {
      nbd: { '*name': 'str', '*description': 'str', '*bitmaps': listOf('str'), '*allocation-depth': 'bool' },
      'vhost-user-blk': {},
      fuse: {},
      'vduse-blk': {},
    },
  },
} as const satisfies TypeSpec;

export const BLOCK_EXPORT_DEL = { id: 'str', '*mode': enumOf('safe', 'hard') } as const satisfies Fields;
