// A QMP client: connects over a Unix socket or TCP (optionally TLS), reads the greeting,
// negotiates capabilities, runs commands (matched to replies by id) and collects events.
// Used by `lockstep qmp`, by tests and by the pair supervisor.

import { EventEmitter } from 'node:events';
import { connect as netConnect, type Socket } from 'node:net';
import { connect as tlsConnect, type ConnectionOptions } from 'node:tls';
import { JsonSplitter, type FrameResult } from './framing.js';
import type { QmpEventMessage } from './events.js';
import type { SocketAddress } from '../util/socket-address.js';


export interface QmpClientOptions {
  /** TLS client options (ca, cert, key, servername...) */
  tls?: ConnectionOptions;
  /** connect + greeting timeout (default 10 s) */
  timeoutMs?: number;
}

/** A command answered with `{"error": {class, desc}}`. */
export class QmpCommandError extends Error {
  override name = 'QmpCommandError';
  constructor(
    readonly errorClass: string,
    readonly desc: string,
    readonly command: string,
  ) {
    super(`${errorClass}: ${desc}`);
  }
}

export interface QmpGreeting {
  QMP: { version: { qemu: { major: number; minor: number; micro: number }; package: string }; capabilities: string[] };
}

// the shapes a server's greeting and events must have before they are handed on as such
const isGreeting = (m: Record<string, unknown>): m is Record<string, unknown> & QmpGreeting =>
  typeof m.QMP === 'object' && m.QMP !== null;
const isEvent = (m: Record<string, unknown>): m is Record<string, unknown> & QmpEventMessage => typeof m.event === 'string';

type Pending = { resolve: (v: unknown) => void; reject: (e: Error) => void; command: string };

export class QmpClient extends EventEmitter {
  greeting: QmpGreeting | null = null;
  /** events received and not yet taken by waitEvent */
  readonly events: QmpEventMessage[] = [];
  private readonly pending = new Map<string, Pending>();
  /** replies that matched no pending command (parse errors, raw requests) */
  private readonly unmatched: Record<string, unknown>[] = [];
  private readonly unmatchedWaiters: Array<(m: Record<string, unknown>) => void> = [];
  private readonly eventWaiters = new Set<() => void>();
  private nextId = 1;
  private closedError: Error | null = null;
  private greetingWaiter: ((g: QmpGreeting) => void) | null = null;

  /** where this client connected, and how: for another connection to the same monitor */
  private target: { addr: SocketAddress; opts: QmpClientOptions } | null = null;

  private constructor(private readonly socket: Socket) {
    super();
    const splitter = new JsonSplitter((r) => this.onFrame(r), 64 * 1024 * 1024);
    socket.on('data', (chunk: Buffer) => splitter.feed(chunk));
    socket.on('error', (err) => this.fail(err));
    socket.on('close', () => this.fail(new Error('QMP connection closed')));
  }

  /** Connects and waits for the greeting (does not negotiate: call negotiate()). */
  static async connect(addr: SocketAddress, opts: QmpClientOptions = {}): Promise<QmpClient> {
    const timeoutMs = opts.timeoutMs ?? 10_000;
    const socket = await new Promise<Socket>((resolve, reject) => {
      let s: Socket;
      const onErr = (e: Error) => reject(e);
      if (opts.tls) {
        const base = addr.type === 'unix' ? { path: addr.path } : { host: addr.host, port: addr.port };
        s = tlsConnect({ ...base, ...opts.tls }, () => resolve(s));
      } else {
        s = addr.type === 'unix' ? netConnect(addr.path, () => resolve(s)) : netConnect(addr.port, addr.host, () => resolve(s));
      }
      s.once('error', onErr);
      s.setTimeout(timeoutMs, () => {
        s.destroy();
        reject(new Error(`QMP connect timed out after ${timeoutMs} ms`));
      });
    });
    socket.setTimeout(0);
    const client = new QmpClient(socket);
    const greeting = await new Promise<QmpGreeting>((resolve, reject) => {
      const t = setTimeout(() => {
        socket.destroy();
        reject(new Error('no QMP greeting'));
      }, timeoutMs);
      client.greetingWaiter = (g) => {
        clearTimeout(t);
        resolve(g);
      };
      socket.once('close', () => {
        clearTimeout(t);
        reject(client.closedError ?? new Error('QMP connection closed before the greeting'));
      });
    });
    client.greeting = greeting;
    client.target = { addr, opts };
    return client;
  }

  /** A second, independent connection to the same monitor (same address and TLS options),
   *  negotiated. The daemon runs each connection's commands in order, so a command that
   *  waits (a drain) on one connection does not hold the other's. */
  openAnother(): Promise<QmpClient> {
    if (!this.target) return Promise.reject(new Error('QMP client has no address to connect to again'));
    return QmpClient.open(this.target.addr, this.target.opts);
  }

  /** Connects and negotiates capabilities. */
  static async open(addr: SocketAddress, opts: QmpClientOptions = {}): Promise<QmpClient> {
    const c = await QmpClient.connect(addr, opts);
    try {
      await c.negotiate();
    } catch (e) {
      c.close();
      throw e;
    }
    return c;
  }

  async negotiate(enable?: string[]): Promise<void> {
    await this.execute('qmp_capabilities', enable ? { enable } : undefined);
  }

  private onFrame(r: FrameResult): void {
    if (!r.ok || typeof r.value !== 'object' || r.value === null) {
      this.emit('protocol-error', r.ok ? 'reply is not an object' : r.error);
      return;
    }
    const msg = r.value as Record<string, unknown>;
    if (isGreeting(msg) && this.greetingWaiter) {
      const w = this.greetingWaiter;
      this.greetingWaiter = null;
      w(msg);
      return;
    }
    if (isEvent(msg)) {
      const ev = msg;
      this.events.push(ev);
      if (this.events.length > 10_000) this.events.shift();
      this.emit('event', ev);
      for (const w of [...this.eventWaiters]) w();
      return;
    }
    const id = msg.id;
    const p = typeof id === 'string' ? this.pending.get(id) : undefined;
    if (p && typeof id === 'string') {
      this.pending.delete(id);
      const err = msg.error as { class?: string; desc?: string } | undefined;
      if (err) p.reject(new QmpCommandError(String(err.class), String(err.desc), p.command));
      else p.resolve(msg.return);
      return;
    }
    const w = this.unmatchedWaiters.shift();
    if (w) w(msg);
    else this.unmatched.push(msg);
  }

  private fail(err: Error): void {
    if (this.closedError) return;
    this.closedError = err;
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
    for (const w of [...this.eventWaiters]) w();
    this.emit('close', err);
  }

  get closed(): boolean {
    return this.closedError !== null;
  }

  /** Runs a command; resolves with `return`, rejects with QmpCommandError on `error`. */
  execute(command: string, args?: Record<string, unknown>): Promise<unknown> {
    if (this.closedError) return Promise.reject(this.closedError);
    const id = `lockstep-${this.nextId++}`;
    const msg: Record<string, unknown> = { execute: command, id };
    if (args !== undefined) msg.arguments = args;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject, command });
      this.socket.write(JSON.stringify(msg) + '\n');
    });
  }

  /** Sends bytes as they are (tests of hostile input). */
  sendRaw(data: string | Buffer): void {
    this.socket.write(data);
  }

  /** The next reply that matched no command sent with execute() (raw requests, parse errors). */
  nextReply(timeoutMs = 10_000): Promise<Record<string, unknown>> {
    const m = this.unmatched.shift();
    if (m) return Promise.resolve(m);
    if (this.closedError) return Promise.reject(this.closedError);
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => {
        const i = this.unmatchedWaiters.indexOf(w);
        if (i >= 0) this.unmatchedWaiters.splice(i, 1);
        reject(new Error(`no QMP reply within ${timeoutMs} ms`));
      }, timeoutMs);
      const w = (msg: Record<string, unknown>) => {
        clearTimeout(t);
        resolve(msg);
      };
      this.unmatchedWaiters.push(w);
    });
  }

  /**
   * Waits for an event named `name` (and matching `pred`), taking it from the buffer; events
   * received before the call count.
   */
  waitEvent(name: string, pred: (data: Record<string, unknown>) => boolean = () => true, timeoutMs = 30_000): Promise<QmpEventMessage> {
    return new Promise((resolve, reject) => {
      const check = (): boolean => {
        const i = this.events.findIndex((e) => e.event === name && pred(e.data ?? {}));
        if (i >= 0) {
          const [ev] = this.events.splice(i, 1);
          resolve(ev!);
          return true;
        }
        if (this.closedError) {
          reject(new Error(`connection closed while waiting for ${name}`));
          return true;
        }
        return false;
      };
      if (check()) return;
      const t = setTimeout(() => {
        this.eventWaiters.delete(w);
        reject(new Error(`no ${name} event within ${timeoutMs} ms`));
      }, timeoutMs);
      const w = () => {
        if (check()) {
          clearTimeout(t);
          this.eventWaiters.delete(w);
        }
      };
      this.eventWaiters.add(w);
    });
  }

  close(): void {
    this.socket.end();
    this.socket.destroy();
  }
}
