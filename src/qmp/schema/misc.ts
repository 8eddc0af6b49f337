// Argument schemas of the monitor's own commands and of objects.

import { enumOf, listOf, type Fields, type TypeSpec } from './types.js';

export const QMP_CAPABILITIES = { '*enable': listOf(enumOf('oob')) } as const satisfies Fields;
export const NO_ARGS = {} as const satisfies Fields;
export const X_QUERY_EVENT_LOOP_DELAY = { '*reset': 'bool' } as const satisfies Fields;
export const HUMAN_MONITOR_COMMAND = { 'command-line': 'str', '*cpu-index': 'int' } as const satisfies Fields;

/** object-add / --object: a flat union on qom-type (the types lockstep implements). */
export const OBJECT_ADD = {
  union: {
    base: { 'qom-type': enumOf('tls-creds-x509', 'tls-creds-psk', 'secret', 'authz-simple'), id: 'str' },
    discriminator: 'qom-type',
    branches: {
      'tls-creds-x509': {
        '*verify-peer': 'bool',
        '*dir': 'str',
        '*endpoint': enumOf('client', 'server'),
        '*priority': 'str',
        '*sanity-check': 'bool',
        '*passwordid': 'str',
      },
      'tls-creds-psk': { '*verify-peer': 'bool', '*dir': 'str', '*endpoint': enumOf('client', 'server'), '*priority': 'str', '*username': 'str' },
      secret: { '*data': 'str', '*file': 'str', '*format': enumOf('raw', 'base64'), '*keyid': 'str', '*iv': 'str' },
      'authz-simple': { identity: 'str' },
    },
  },
} as const satisfies TypeSpec;

export const OBJECT_DEL = { id: 'str' } as const satisfies Fields;
