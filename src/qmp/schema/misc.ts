// Argument schemas of the monitor's own commands and of objects.

import { enumOf, listOf, type Fields, type TypeSpec } from './types.js';

export const QMP_CAPABILITIES: Fields = { '*enable': listOf(enumOf('oob')) };
export const NO_ARGS: Fields = {};
export const X_QUERY_EVENT_LOOP_DELAY: Fields = { '*reset': 'bool' };
export const HUMAN_MONITOR_COMMAND: Fields = { 'command-line': 'str', '*cpu-index': 'int' };

/** object-add / --object: a flat union on qom-type (the types lockstep implements). */
export const OBJECT_ADD: TypeSpec = {
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
};

export const OBJECT_DEL: Fields = { id: 'str' };
