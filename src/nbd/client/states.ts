// The NBD client's connection states and their legal transitions.

import { assert } from '../../errors.js';

export type ClientState = 'connecting' | 'negotiating' | 'ready' | 'disconnecting' | 'dead' | 'closed';

export const CLIENT_TRANSITIONS: Record<ClientState, readonly ClientState[]> = {
  connecting: ['negotiating', 'dead'],
  negotiating: ['ready', 'dead', 'closed'],
  ready: ['disconnecting', 'dead'],
  disconnecting: ['closed', 'dead'],
  // a lost connection: every request fails with EIO; only closing remains
  dead: ['closed'],
  closed: [],
};

/** Which states accept new requests. */
export const ACCEPTS_REQUESTS: Record<ClientState, boolean> = {
  connecting: false,
  negotiating: false,
  ready: true,
  disconnecting: false,
  dead: false,
  closed: false,
};

export function checkTransition(from: ClientState, to: ClientState): void {
  assert(CLIENT_TRANSITIONS[from].includes(to), `NBD client: illegal transition ${from} -> ${to}`);
}
