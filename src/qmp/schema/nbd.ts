// Argument schemas of the NBD server and block export commands (qapi/block-export.json,
// qapi/sockets.json). nbd-server-start takes the legacy address form
// ({type, data: {...}}); --nbd-server and block-export-add the flat one.

import { enumOf, listOf, struct, type Fields, type TypeSpec } from './types.js';

const INET: Fields = {
  host: 'str',
  port: 'str',
  '*numeric': 'bool',
  '*to': 'uint64',
  '*ipv4': 'bool',
  '*ipv6': 'bool',
  '*keep-alive': 'bool',
  '*mptcp': 'bool',
};
const UNIX: Fields = { path: 'str', '*abstract': 'bool', '*tight': 'bool' };
const VSOCK: Fields = { cid: 'str', port: 'str' };
const FD: Fields = { str: 'str' };

/** SocketAddressLegacy: {type, data: {...}} */
export const SOCKET_ADDRESS_LEGACY: TypeSpec = {
  union: {
    base: { type: enumOf('inet', 'unix', 'vsock', 'fd') },
    discriminator: 'type',
    branches: { inet: { data: struct(INET) }, unix: { data: struct(UNIX) }, vsock: { data: struct(VSOCK) }, fd: { data: struct(FD) } },
  },
};

/** SocketAddress: flat {type, host, port} / {type, path} */
export const SOCKET_ADDRESS: TypeSpec = {
  union: { base: { type: enumOf('inet', 'unix', 'vsock', 'fd') }, discriminator: 'type', branches: { inet: INET, unix: UNIX, vsock: VSOCK, fd: FD } },
};

export const NBD_SERVER_START: Fields = {
  addr: SOCKET_ADDRESS_LEGACY,
  '*tls-creds': 'str',
  '*tls-authz': 'str',
  '*max-connections': 'uint64',
  // lockstep extension: seconds a client at the cap may idle before a newcomer replaces it
  '*x-idle-timeout': 'number',
};

/** --nbd-server (NbdServerOptions) */
export const NBD_SERVER_OPTIONS: Fields = {
  addr: SOCKET_ADDRESS,
  '*tls-creds': 'str',
  '*tls-authz': 'str',
  '*max-connections': 'uint64',
  // lockstep extension: seconds a client at the cap may idle before a newcomer replaces it
  '*x-idle-timeout': 'number',
};

export const NBD_SERVER_ADD: Fields = {
  device: 'str',
  '*name': 'str',
  '*description': 'str',
  '*writable': 'bool',
  '*bitmap': 'str',
};

export const NBD_SERVER_REMOVE: Fields = { name: 'str', '*mode': enumOf('safe', 'hard') };

const EXPORT_BASE: Fields = {
  type: enumOf('nbd', 'vhost-user-blk', 'fuse', 'vduse-blk'),
  id: 'str',
  '*fixed-iothread': 'bool',
  '*iothread': 'str',
  'node-name': 'str',
  '*writable': 'bool',
  '*writethrough': 'bool',
};

export const BLOCK_EXPORT_ADD: TypeSpec = {
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
};

export const BLOCK_EXPORT_DEL: Fields = { id: 'str', '*mode': enumOf('safe', 'hard') };
