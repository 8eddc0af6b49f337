// NbdServer: listeners, exports added and removed at run time, and the connections.
//
//   const server = new NbdServer({ graph, maxConnections: 100, tls: { key, cert, ca, verifyPeer }, tlsRequired: true });
//   const addr = await server.listen({ type: 'inet', host: '127.0.0.1', port: 0 }); // -> { type, host, port }
//   await server.listen({ type: 'unix', path: '/run/x.sock' });                     // several listeners are fine
//   server.addExport({ name: 'disk0', node: 'node0' | blockNode, writable: true, description: 'primary disk' });
//   server.exports;                                   // ExportInfo[] (name, nodeName, writable, connections...)
//   await server.removeExport('disk0', 'safe');       // StateError while clients are connected
//   await server.removeExport('disk0', 'hard');       // drops its clients, waits for their requests
//   await server.close();                             // stops listening, drains every connection
//
// Each export holds a user Backend (graph.createBackend(node, { readOnly, user: true })): it
// counts as a block backend for replication, but export names are their own namespace (as in
// QEMU, an export may share its name with a node), so the backend is not registered by name;
// released when the export is removed. Errors of the Backend (fenced writes: EIO) reach the
// client through nbd/errno.ts.

import { nbdExportPerms } from '../../block/permissions.js';
import { createServer, type Server, type Socket } from 'node:net';
import { lstat, unlink } from 'node:fs/promises';
import { createSecureContext, type SecureContext } from 'node:tls';
import type { BlockGraph } from '../../block/graph.js';
import type { BlockNode } from '../../block/node.js';
import { InvalidArgumentError, NotFoundError, StateError, errorMessage } from '../../errors.js';
import type { TlsServerConfig } from '../tls.js';
import { StreamReader } from '../stream.js';
import { NbdExport, type ExportConnection, type ExportInfo } from './export.js';
import { negotiate, type HandshakeHost } from './handshake.js';
import { Transmission } from './transmission.js';
import { PayloadPool } from './payload-pool.js';
import { MAX_STRING } from '../protocol.js';
import type { SocketAddress } from '../../util/socket-address.js';


export interface NbdServerOptions {
  graph: BlockGraph;
  /** simultaneous client connections over all listeners (default 100, 0: unlimited as in
   *  QEMU); more are closed at once */
  maxConnections?: number;
  tls?: TlsServerConfig;
  /** refuse every option but STARTTLS before the TLS upgrade (default: true when tls is set) */
  tlsRequired?: boolean;
  /**
   * lockstep extension (x-idle-timeout): when a client arrives at max-connections, the
   * handshake-complete connection idle longest (no request in flight) is closed for it if it
   * has been idle at least this long (default 30 s; 0: never, the newcomer is refused)
   */
  idleTimeoutMs?: number;
  /** a client must finish its handshake within this time (default 10 s, as QEMU) */
  handshakeTimeoutMs?: number;
  /** in-flight requests per connection (default 64) */
  maxInFlight?: number;
  /** in-flight payload bytes per connection before the socket is paused (default 64 MiB) */
  maxInFlightBytes?: number;
  /**
   * buffers for large write payloads, shared by the server's connections (default: a pool of
   * 64 MiB idle at most, poisoning when LOCKSTEP_DEBUG_POISON_PAYLOADS=1; null: none)
   */
  payloadPool?: PayloadPool | null;
  /** diagnostics (dropped connections, protocol violations) */
  log?: (msg: string) => void;
}

export interface AddExportOptions {
  /** export name clients ask for; also the Backend's name (unique among backends) */
  name: string;
  /** a BlockNode or a node-name */
  node: BlockNode | string;
  writable?: boolean;
  description?: string;
  /** dirty bitmap exports (qemu:dirty-bitmap) are not implemented: giving one is an error */
  bitmap?: string;
  /**
   * Advertise NBD_FLAG_CAN_MULTI_CONN. 'auto' (default): only for read-only exports. Every
   * connection of an export shares one Backend, so a flush on one covers writes completed on
   * all; 'on' states that for writable exports too.
   */
  multiConn?: 'auto' | 'on' | 'off';
}

class Connection implements ExportConnection {
  transmission: Transmission | null = null;
  exp: NbdExport | null = null;
  readonly closed: Promise<void>;
  private resolveClosed!: () => void;
  constructor(readonly socket: Socket) {
    this.closed = new Promise((r) => (this.resolveClosed = r));
  }
  abort(): void {
    if (this.transmission) this.transmission.abort();
    else this.socket.destroy();
  }
  markClosed(): void {
    this.resolveClosed();
  }
}

export class NbdServer implements HandshakeHost {
  readonly graph: BlockGraph;
  private readonly listeners: Array<{ server: Server; address: SocketAddress }> = [];
  private readonly exportMap = new Map<string, NbdExport>();
  private readonly connections = new Set<Connection>();
  readonly tls: { context: SecureContext; verifyPeer: boolean } | null;
  readonly tlsRequired: boolean;
  shuttingDown = false;
  private readonly maxConnections: number;
  private readonly handshakeTimeoutMs: number;
  private readonly idleTimeoutMs: number;
  private readonly maxInFlight: number;
  private readonly maxInFlightBytes: number;
  private readonly log: (msg: string) => void;
  readonly payloadPool: PayloadPool | null;

  constructor(opts: NbdServerOptions) {
    this.graph = opts.graph;
    this.maxConnections = opts.maxConnections ?? 100;
    this.handshakeTimeoutMs = opts.handshakeTimeoutMs ?? 10_000;
    this.idleTimeoutMs = opts.idleTimeoutMs ?? 30_000;
    this.maxInFlight = opts.maxInFlight ?? 64;
    this.maxInFlightBytes = opts.maxInFlightBytes ?? 64 * 1024 * 1024;
    this.log = opts.log ?? (() => {});
    this.payloadPool = opts.payloadPool !== undefined ? opts.payloadPool : new PayloadPool({ poison: process.env.LOCKSTEP_DEBUG_POISON_PAYLOADS === '1' });
    if (!Number.isSafeInteger(this.maxConnections) || this.maxConnections < 0) throw new InvalidArgumentError('max-connections must be a non-negative integer');
    if (!Number.isFinite(this.idleTimeoutMs) || this.idleTimeoutMs < 0) throw new InvalidArgumentError('x-idle-timeout must be a non-negative number of seconds');
    if (!Number.isSafeInteger(this.maxInFlight) || this.maxInFlight < 1) throw new InvalidArgumentError('maxInFlight must be a positive integer');
    if (opts.tls) {
      const t = opts.tls;
      try {
        const ctxOpts: { key: Buffer | string; cert: Buffer | string; ca?: Buffer | string } = { key: t.key, cert: t.cert };
        if (t.ca !== undefined) ctxOpts.ca = t.ca;
        this.tls = { context: createSecureContext(ctxOpts), verifyPeer: t.verifyPeer ?? false };
      } catch (e) {
        throw new InvalidArgumentError(`Invalid TLS credentials: ${errorMessage(e)}`);
      }
      if (this.tls.verifyPeer && t.ca === undefined) throw new InvalidArgumentError('verify-peer needs a CA certificate');
    } else {
      this.tls = null;
    }
    this.tlsRequired = opts.tlsRequired ?? this.tls !== null;
    if (this.tlsRequired && !this.tls) throw new InvalidArgumentError('TLS is required but no TLS credentials were given');
  }

  // ---- listeners ------------------------------------------------------------------------

  /** Starts listening; resolves with the bound address (the real port when port is 0). */
  async listen(addr: SocketAddress<number | string>): Promise<SocketAddress> {
    if (this.shuttingDown) throw new StateError('NBD server is shutting down');
    const server = createServer((socket) => this.accept(socket));
    server.on('error', (e) => this.log(`listener error: ${errorMessage(e)}`));
    if (addr.type === 'unix') {
      if (!addr.path) throw new InvalidArgumentError(`Parameter 'path' is missing`);
      await listenOn(server, { path: addr.path });
      const bound: SocketAddress = { type: 'unix', path: addr.path };
      this.listeners.push({ server, address: bound });
      return bound;
    }
    const port = typeof addr.port === 'string' ? Number(addr.port) : addr.port;
    if (!Number.isInteger(port) || port < 0 || port > 65535) throw new InvalidArgumentError(`Invalid port '${addr.port}'`);
    await listenOn(server, { host: addr.host, port });
    const a = server.address();
    const bound: SocketAddress = { type: 'inet', host: addr.host, port: typeof a === 'object' && a ? a.port : port };
    this.listeners.push({ server, address: bound });
    return bound;
  }

  get addresses(): SocketAddress[] {
    return this.listeners.map((l) => l.address);
  }

  // ---- exports ----------------------------------------------------------------------------

  addExport(opts: AddExportOptions): ExportInfo {
    if (this.shuttingDown) throw new StateError('NBD server is shutting down');
    if (typeof opts.name !== 'string' || Buffer.byteLength(opts.name) > MAX_STRING) throw new InvalidArgumentError('export name must be a string of at most 4096 bytes');
    if (this.exportMap.has(opts.name)) throw new InvalidArgumentError(`Block export id '${opts.name}' is already in use`);
    if (opts.bitmap !== undefined) throw new InvalidArgumentError(`Exporting dirty bitmaps is not supported by lockstep yet (bitmap '${opts.bitmap}')`);
    const description = opts.description ?? '';
    if (Buffer.byteLength(description) > MAX_STRING) throw new InvalidArgumentError('export description is longer than 4096 bytes');
    const node = typeof opts.node === 'string' ? this.graph.find(opts.node) : opts.node;
    const writable = opts.writable ?? false;
    if (writable && node.readOnly) throw new InvalidArgumentError(`Cannot export node '${node.name}' writable: it is read-only`);
    const multiConn = opts.multiConn === 'on' || ((opts.multiConn ?? 'auto') === 'auto' && !writable);
    // QEMU's order: the export's handle shares everything when it is attached, and then
    // stops sharing resize (so a conflict is reported as QEMU reports it)
    const backend = this.graph.createBackend(node, { readOnly: !writable, user: true });
    try {
      this.graph.setBackendPerms(backend, nbdExportPerms(writable));
    } catch (e) {
      this.graph.releaseBackend(backend);
      throw e;
    }
    const exp = new NbdExport(opts.name, description, backend, writable, multiConn);
    this.exportMap.set(opts.name, exp);
    return exp.info();
  }

  /**
   * Removes an export. 'safe' refuses while clients are connected (QEMU's nbd-server-remove);
   * 'hard' drops them. Resolves once the export's requests have finished and its Backend is
   * released.
   */
  async removeExport(name: string, mode: 'safe' | 'hard' = 'safe'): Promise<void> {
    const exp = this.exportMap.get(name);
    if (!exp) throw new NotFoundError(`Export '${name}' is not found`);
    if (mode === 'safe' && exp.connections.size > 0) {
      throw new StateError(`export '${name}' still has ${exp.connections.size} connection(s)`);
    }
    this.exportMap.delete(name);
    exp.removed = true;
    const conns = [...exp.connections];
    for (const c of conns) c.abort();
    await Promise.all(conns.map((c) => c.closed));
    this.graph.releaseBackend(exp.backend);
  }

  get exports(): ExportInfo[] {
    return [...this.exportMap.values()].map((e) => e.info());
  }

  findExport(name: string): NbdExport | undefined {
    const e = this.exportMap.get(name);
    if (e) return e;
    if (name === '' && this.exportMap.size === 1) return this.exportMap.values().next().value;
    return undefined;
  }

  listExports(): NbdExport[] {
    return [...this.exportMap.values()];
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  // ---- connections ------------------------------------------------------------------------

  private accept(socket: Socket): void {
    if (!this.shuttingDown && this.maxConnections !== 0 && this.connections.size >= this.maxConnections) this.evictIdle();
    if (this.shuttingDown || (this.maxConnections !== 0 && this.connections.size >= this.maxConnections)) {
      this.log(`refusing connection: ${this.shuttingDown ? 'shutting down' : 'too many connections'}`);
      socket.destroy();
      return;
    }
    socket.setNoDelay(true);
    const conn = new Connection(socket);
    this.connections.add(conn);
    void this.serve(conn).finally(() => {
      this.connections.delete(conn);
      if (conn.exp) conn.exp.connections.delete(conn);
      conn.markClosed();
    });
  }

  /**
   * At the cap: closes the handshake-complete connection idle longest, if idle at least the
   * idle timeout, and forgets it at once so that the newcomer takes its place.
   */
  private evictIdle(): void {
    if (this.idleTimeoutMs === 0) return;
    let oldest: Connection | null = null;
    for (const c of this.connections) {
      const t = c.transmission;
      if (!t || t.busy) continue;
      if (!oldest || t.lastActive < oldest.transmission!.lastActive) oldest = c;
    }
    if (!oldest) return;
    const idleMs = Date.now() - oldest.transmission!.lastActive;
    if (idleMs < this.idleTimeoutMs) return;
    this.log(`closing connection idle for ${idleMs} ms to make room for a new client`);
    this.connections.delete(oldest);
    oldest.abort();
  }

  private async serve(conn: Connection): Promise<void> {
    const socket = conn.socket;
    socket.on('error', () => {});
    const reader = new StreamReader(socket);
    // Destroying the socket also ends a TLS handshake that a client started and never finished.
    const timer = setTimeout(() => {
      reader.fail(new Error('handshake timed out'));
      socket.destroy();
    }, this.handshakeTimeoutMs);
    let neg;
    try {
      neg = await negotiate(socket, reader, this);
    } catch (e) {
      this.log(`handshake failed: ${errorMessage(e)}`);
      socket.destroy();
      return;
    } finally {
      clearTimeout(timer);
    }
    if (!neg) {
      // NBD_OPT_ABORT: the client closes; make sure we do too once the ACK is out.
      reader.detach();
      socket.end();
      setTimeout(() => socket.destroy(), 1000).unref();
      return;
    }
    reader.detach();
    neg.stream.on('error', () => {});
    if (neg.exp.removed) {
      neg.stream.destroy();
      return;
    }
    conn.exp = neg.exp;
    neg.exp.connections.add(conn);
    const t = new Transmission(
      neg.stream,
      neg.exp,
      reader.queue,
      {
        structured: neg.structured,
        extended: neg.extended,
        baseAllocation: neg.baseAllocation,
        maxInFlight: this.maxInFlight,
        maxInFlightBytes: this.maxInFlightBytes,
        payloadPool: this.payloadPool ?? undefined,
      },
      this.log,
    );
    conn.transmission = t;
    await t.done;
  }

  /** Stops listening, lets every connection finish its in-flight requests, releases the exports. */
  async close(): Promise<void> {
    this.shuttingDown = true;
    // net.Server#close calls back only once every accepted socket is gone: start it, then drain.
    const listenersClosed = Promise.all(this.listeners.map((l) => new Promise<void>((r) => l.server.close(() => r()))));
    this.listeners.length = 0;
    const conns = [...this.connections];
    for (const c of conns) {
      if (c.transmission) void c.transmission.drainAndClose();
      else c.socket.destroy();
    }
    await Promise.all(conns.map((c) => c.closed));
    await listenersClosed;
    for (const exp of this.exportMap.values()) {
      exp.removed = true;
      this.graph.releaseBackend(exp.backend);
    }
    this.exportMap.clear();
  }
}

/** As QEMU's unix_listen_saddr, a socket left at the path (a daemon killed before it could
 *  remove it) is unlinked before the bind; anything else there is left alone (the bind fails). */
async function removeStaleSocket(path: string): Promise<void> {
  try {
    if (!(await lstat(path)).isSocket()) return;
    await unlink(path);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw new InvalidArgumentError(`Failed to unlink socket ${path}: ${errorMessage(e)}`);
  }
}

async function listenOn(server: Server, opts: { path: string } | { host: string; port: number }): Promise<void> {
  if ('path' in opts) await removeStaleSocket(opts.path);
  return new Promise((resolve, reject) => {
    const onError = (e: Error): void => reject(new InvalidArgumentError(`Failed to listen on ${'path' in opts ? opts.path : `${opts.host}:${opts.port}`}: ${e.message}`));
    server.once('error', onError);
    server.listen(opts, () => {
      server.off('error', onError);
      resolve();
    });
  });
}
