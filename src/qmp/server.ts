// The QMP server: listeners (Unix, TCP, TLS over TCP), one session per connection, the
// greeting, capabilities negotiation, request checks with QEMU's messages, `id` echo, events.
//
// Requests of one connection run one after the other, in order (QEMU serialises in-band
// commands per monitor too); at most MAX_QUEUED requests wait, then the socket is paused until
// the queue drains. A client that stops reading cannot make the daemon buffer without end:
// past MAX_OUTPUT_BUFFER bytes of unsent output the connection is dropped.
//
// At most maxConnections (64) clients at once. A newcomer at the cap takes the place of the
// client idle longest, if that one has been idle at least idleTimeoutMs (default 30 s, 0:
// never; daemon option --x-monitor-idle-timeout); a client with a command queued or running
// is never idle. Otherwise the newcomer is refused, as before.

import { createServer as createNetServer, type Server, type Socket } from 'node:net';
import { createServer as createTlsServer, type TlsOptions } from 'node:tls';
import { unlinkSync } from 'node:fs';
import { InvalidArgumentError, errorMessage } from '../errors.js';
import type { QmpContext, QmpSession } from './dispatch.js';
import { span } from '../util/trace.js';
import { isExpectedError, toQmpError, QmpError, type QmpErrorBody } from './errors.js';
import type { QmpEventMessage } from './events.js';
import { JsonSplitter, DEFAULT_MAX_MESSAGE_SIZE, type FrameResult } from './framing.js';
import type { SocketAddress } from '../util/socket-address.js';


export interface MonitorListenOptions {
  /** TLS server options (key, cert, ca, requestCert, rejectUnauthorized) for a TCP monitor */
  tls?: TlsOptions;
  /** label for logs (the chardev id) */
  id?: string;
}

const MAX_QUEUED = 8;
const MAX_OUTPUT_BUFFER = 16 * 1024 * 1024;
const MAX_CONNECTIONS = 64;

interface Connection {
  readonly socket: Socket;
  readonly session: QmpSession;
  readonly queue: unknown[];
  running: boolean;
  paused: boolean;
  /** when the client last sent bytes or got its last reply */
  lastActive: number;
  unsubscribe: (() => void) | null;
}

export class QmpServer {
  private readonly listeners: Array<{ server: Server; address: SocketAddress; unixPath?: string }> = [];
  private readonly connections = new Set<Connection>();
  private nextSessionId = 1;
  private closing = false;

  constructor(
    private readonly ctx: QmpContext,
    private readonly opts: { maxMessageSize?: number; maxConnections?: number; idleTimeoutMs?: number } = {},
  ) {
    const idle = opts.idleTimeoutMs ?? 30_000;
    if (!Number.isFinite(idle) || idle < 0) throw new InvalidArgumentError('monitor idle timeout must be a non-negative number of seconds');
  }

  /** Starts listening; resolves with the bound address (the real port when port 0 was asked). */
  async listen(address: SocketAddress, lopts: MonitorListenOptions = {}): Promise<SocketAddress> {
    const onConn = (socket: Socket) => this.accept(socket, lopts.id);
    // a TLS client must finish its handshake in time; plain clients may idle
    const server = lopts.tls ? createTlsServer({ handshakeTimeout: 10_000, ...lopts.tls }, onConn) : createNetServer(onConn);
    server.on('tlsClientError', (err: Error) => this.ctx.log.warn('monitor TLS handshake failed', { monitor: lopts.id, error: err.message }));
    if (address.type === 'unix') {
      try {
        unlinkSync(address.path); // a stale socket from an earlier run (QEMU does the same)
      } catch {
        /* absent */
      }
    }
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      if (address.type === 'unix') server.listen(address.path, () => resolve());
      else server.listen(address.port, address.host, () => resolve());
    });
    server.on('error', (err) => this.ctx.log.error('monitor listener error', { monitor: lopts.id, error: err.message }));
    let bound: SocketAddress = address;
    if (address.type === 'inet') {
      const a = server.address();
      if (a && typeof a === 'object') bound = { type: 'inet', host: address.host, port: a.port };
    }
    this.listeners.push({ server, address: bound, ...(address.type === 'unix' ? { unixPath: address.path } : {}) });
    return bound;
  }

  get addresses(): SocketAddress[] {
    return this.listeners.map((l) => l.address);
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  private accept(socket: Socket, monitorId: string | undefined): void {
    const max = this.opts.maxConnections ?? MAX_CONNECTIONS;
    if (!this.closing && this.connections.size >= max) this.evictIdle(monitorId);
    if (this.closing || this.connections.size >= max) {
      this.ctx.log.warn('monitor connection refused', { monitor: monitorId, reason: this.closing ? 'shutting down' : 'too many connections' });
      socket.destroy();
      return;
    }
    const session: QmpSession = { id: this.nextSessionId++, negotiated: false, oob: false };
    const conn: Connection = { socket, session, queue: [], running: false, paused: false, lastActive: Date.now(), unsubscribe: null };
    this.connections.add(conn);
    const log = this.ctx.log.child({ monitor: monitorId, session: session.id });
    log.debug('monitor client connected');
    socket.setNoDelay?.(true);
    const splitter = new JsonSplitter((r) => this.onFrame(conn, r), this.opts.maxMessageSize ?? DEFAULT_MAX_MESSAGE_SIZE);
    socket.on('data', (chunk: Buffer) => {
      conn.lastActive = Date.now();
      splitter.feed(chunk);
    });
    socket.on('error', (err) => log.debug('monitor client error', { error: err.message }));
    socket.on('close', () => {
      conn.unsubscribe?.();
      this.connections.delete(conn);
      log.debug('monitor client disconnected');
    });
    this.send(conn, { QMP: { version: this.ctx.version, capabilities: ['oob'] } });
  }

  /**
   * At the cap: drops the client idle longest if idle at least the idle timeout, and forgets
   * it at once so that the newcomer takes its place.
   */
  private evictIdle(monitorId: string | undefined): void {
    const timeout = this.opts.idleTimeoutMs ?? 30_000;
    if (timeout === 0) return;
    let oldest: Connection | null = null;
    for (const c of this.connections) {
      if (c.running || c.queue.length > 0) continue; // waiting for a reply: not idle
      if (!oldest || c.lastActive < oldest.lastActive) oldest = c;
    }
    if (!oldest) return;
    const idleMs = Date.now() - oldest.lastActive;
    if (idleMs < timeout) return;
    this.ctx.log.info('closing idle monitor connection to make room for a new client', { monitor: monitorId, session: oldest.session.id, idleMs });
    oldest.unsubscribe?.();
    this.connections.delete(oldest);
    oldest.socket.destroy();
  }

  private send(conn: Connection, msg: unknown): void {
    const s = conn.socket;
    if (s.destroyed || !s.writable) return;
    if (s.writableLength > MAX_OUTPUT_BUFFER) {
      this.ctx.log.warn('monitor client does not read its replies: dropping it', { session: conn.session.id });
      s.destroy();
      return;
    }
    s.write(JSON.stringify(msg) + '\r\n');
  }

  private onFrame(conn: Connection, r: FrameResult): void {
    if (!r.ok) {
      // answered in order with the other requests; it has no id
      conn.queue.push(new ParseError(r.error));
    } else {
      conn.queue.push(r.value);
    }
    if (conn.queue.length >= MAX_QUEUED && !conn.paused) {
      conn.paused = true;
      conn.socket.pause();
    }
    void this.pump(conn);
  }

  private async pump(conn: Connection): Promise<void> {
    if (conn.running) return;
    conn.running = true;
    try {
      while (conn.queue.length > 0 && !conn.socket.destroyed) {
        const req = conn.queue.shift();
        const reply = await this.handle(conn, req);
        if (reply) this.send(conn, reply);
        conn.lastActive = Date.now();
        if (conn.paused && conn.queue.length < MAX_QUEUED / 2) {
          conn.paused = false;
          conn.socket.resume();
        }
      }
    } finally {
      conn.running = false;
    }
  }

  private async handle(conn: Connection, req: unknown): Promise<Record<string, unknown> | null> {
    if (req instanceof ParseError) return errorReply(undefined, { class: 'GenericError', desc: req.desc }, false);
    let id: unknown;
    let hasId = false;
    try {
      if (typeof req !== 'object' || req === null || Array.isArray(req)) throw QmpError.generic('QMP input must be a JSON object');
      const obj = req as Record<string, unknown>;
      hasId = 'id' in obj;
      id = obj.id;
      let execKey: string | null = null;
      for (const [k, v] of Object.entries(obj)) {
        if (k === 'execute' || (k === 'exec-oob' && conn.session.oob)) {
          if (typeof v !== 'string') throw QmpError.generic(`QMP input member '${k}' must be a string`);
          if (execKey) throw QmpError.generic(`QMP input member '${k}' clashes with '${execKey}'`);
          execKey = k;
        } else if (k === 'arguments') {
          if (typeof v !== 'object' || v === null || Array.isArray(v)) throw QmpError.generic(`QMP input member 'arguments' must be an object`);
        } else if (k !== 'id') {
          throw QmpError.generic(`QMP input member '${k}' is unexpected`);
        }
      }
      if (!execKey) throw QmpError.generic(`QMP input lacks member 'execute'`);
      const name = obj[execKey] as string;
      const args = (obj.arguments ?? {}) as Record<string, unknown>;
      if (execKey === 'exec-oob' && !this.ctx.dispatcher.get(name)?.allowOob) {
        if (!this.ctx.dispatcher.get(name)) throw new QmpError('CommandNotFound', `The command ${name} has not been found`);
        throw QmpError.generic(`The command ${name} does not support OOB`);
      }
      const ret = await span(`qmp ${name}`, -1, this.run(conn, name, args));
      return hasId ? { return: ret, id } : { return: ret };
    } catch (e) {
      if (!isExpectedError(e)) this.ctx.log.error('QMP command failed unexpectedly', { session: conn.session.id, error: errorMessage(e), stack: (e as Error)?.stack });
      return errorReply(id, toQmpError(e), hasId);
    }
  }

  private async run(conn: Connection, name: string, args: Record<string, unknown>): Promise<unknown> {
    const session = conn.session;
    if (name === 'qmp_capabilities') {
      if (session.negotiated) throw new QmpError('CommandNotFound', 'Capabilities negotiation is already complete, command ignored');
      await this.ctx.dispatcher.execute(this.ctx, session, name, args);
      session.negotiated = true;
      conn.unsubscribe = this.ctx.events.subscribe((msg: QmpEventMessage) => this.send(conn, msg));
      return {};
    }
    if (!session.negotiated) throw new QmpError('CommandNotFound', "Expecting capabilities negotiation with 'qmp_capabilities'");
    this.ctx.log.debug('QMP command', { session: session.id, command: name });
    return this.ctx.dispatcher.execute(this.ctx, session, name, args);
  }

  /** Stops accepting, then closes every connection once pending replies are written. */
  async close(): Promise<void> {
    this.closing = true;
    const closes = this.listeners.map(
      (l) =>
        new Promise<void>((resolve) => {
          l.server.close(() => resolve());
        }),
    );
    for (const conn of this.connections) {
      conn.unsubscribe?.();
      conn.socket.end();
      // a client that never reads must not hold the shutdown
      setTimeout(() => conn.socket.destroy(), 2000).unref();
    }
    await Promise.all(closes);
    for (const l of this.listeners) {
      if (l.unixPath) {
        try {
          unlinkSync(l.unixPath);
        } catch {
          /* gone */
        }
      }
    }
    this.listeners.length = 0;
  }
}

class ParseError {
  constructor(readonly desc: string) {}
}

function errorReply(id: unknown, err: QmpErrorBody, hasId: boolean): Record<string, unknown> {
  return hasId ? { id, error: err } : { error: err };
}
