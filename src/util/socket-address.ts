// A socket address, flat as QMP's SocketAddress spells it: the one type for every socket
// lockstep listens on or connects to (the monitor, the NBD server and its exports, the NBD
// and QMP clients, the pair's forward link).

/**
 * `Port` is a number once lockstep has parsed it (what it binds, connects to, reports);
 * number | string where a port arrives from options as QEMU takes it (a service name too).
 */
export type SocketAddress<Port extends number | string = number> = { type: 'inet'; host: string; port: Port } | { type: 'unix'; path: string };
