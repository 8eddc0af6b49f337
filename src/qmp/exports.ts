// Block exports and the daemon's one NBD server (--nbd-server, --export, nbd-server-start,
// nbd-server-add, block-export-add and friends share this table, as in QEMU). The NBD server
// itself is src/nbd's NbdServer, made by a factory the daemon wires (unit tests pass a fake
// that has the real class's methods, NbdServerHandle).
//
// Safety rule: without TLS, an NBD server that listens on a non-loopback address serves no
// writable export unless the daemon runs with --insecure.

import { isIP } from 'node:net';
import type { BlockGraph } from '../block/graph.js';
import type { BlockNode } from '../block/node.js';
import { InvalidArgumentError, NotFoundError, StateError } from '../errors.js';
import type { EventBus } from './events.js';
import type { NbdServer } from '../nbd/server/server.js';
import type { TlsCredsX509 } from '../nbd/tls.js';
import type { Logger } from '../util/log.js';
import type { ObjectTable } from './objects.js';
import type { SocketAddress } from '../util/socket-address.js';


/** The NbdServer methods the table calls (the real class's signatures). */
export type NbdServerHandle = Pick<NbdServer, 'listen' | 'addExport' | 'removeExport' | 'close'>;

export interface NbdServerConfig {
  graph: BlockGraph;
  maxConnections?: number;
  /** x-idle-timeout, in seconds */
  idleTimeout?: number;
  tls?: TlsCredsX509;
}

export type NbdServerFactory = (cfg: NbdServerConfig) => NbdServerHandle;

export interface ExportInfo {
  readonly type: 'nbd';
  readonly id: string;
  readonly name: string;
  readonly node: BlockNode;
  readonly nodeName: string;
  readonly writable: boolean;
  readonly description?: string;
}

export interface NbdStartOptions {
  addrs: SocketAddress[];
  tlsCreds?: string;
  maxConnections?: number;
  /** x-idle-timeout, in seconds */
  idleTimeout?: number;
}

/** true for 127.0.0.0/8, ::1, ::ffff:127.x and 'localhost' */
export function isLoopbackHost(host: string): boolean {
  const h = host.replace(/^\[|\]$/g, '').toLowerCase();
  if (h === 'localhost' || h === 'ip6-localhost') return true;
  if (isIP(h) === 4) return h.startsWith('127.');
  if (isIP(h) === 6) return h === '::1' || h.startsWith('::ffff:127.');
  return false;
}

export function describeAddress(a: SocketAddress): string {
  return a.type === 'unix' ? `unix:${a.path}` : `${a.host.includes(':') ? `[${a.host}]` : a.host}:${a.port}`;
}

export class ExportTable {
  private server: NbdServerHandle | null = null;
  /** the server listens on a non-loopback address without TLS */
  private exposedPlain = false;
  private serverAddresses: SocketAddress[] = [];
  private releaseCreds: (() => void) | null = null;
  private readonly exportsById = new Map<string, ExportInfo>();

  constructor(
    private readonly graph: BlockGraph,
    private readonly objects: ObjectTable,
    private readonly events: EventBus,
    private readonly log: Logger,
    private readonly factory: NbdServerFactory | null,
    private readonly insecure: boolean,
  ) {}

  get nbdRunning(): boolean {
    return this.server !== null;
  }

  get nbdAddresses(): readonly SocketAddress[] {
    return this.serverAddresses;
  }

  async startNbd(o: NbdStartOptions): Promise<void> {
    if (this.server) throw new StateError('NBD server already running');
    if (!this.factory) throw new StateError('NBD server is not available in this build');
    const tls = o.tlsCreds !== undefined ? this.objects.tlsCreds(o.tlsCreds, 'server') : undefined;
    const server = this.factory({ graph: this.graph, ...(o.maxConnections !== undefined ? { maxConnections: o.maxConnections } : {}), ...(o.idleTimeout !== undefined ? { idleTimeout: o.idleTimeout } : {}), ...(tls ? { tls } : {}) });
    const bound: SocketAddress[] = [];
    for (const addr of o.addrs) {
      try {
        const b = await server.listen(addr);
        bound.push(addr.type === 'inet' && b.type === 'inet' ? { type: 'inet', host: addr.host, port: b.port } : addr);
      } catch (e) {
        await server.close().catch(() => {});
        throw new InvalidArgumentError(`Failed to listen on ${describeAddress(addr)}: ${(e as Error).message}`);
      }
    }
    this.server = server;
    this.serverAddresses = bound;
    this.exposedPlain = !tls && bound.some((a) => a.type === 'inet' && !isLoopbackHost(a.host));
    this.releaseCreds = o.tlsCreds !== undefined ? this.objects.use(o.tlsCreds) : null;
    if (this.exposedPlain) {
      this.log.warn(
        this.insecure
          ? 'NBD server listens on a non-loopback address without TLS (--insecure): writable exports are reachable by anyone on the network'
          : 'NBD server listens on a non-loopback address without TLS: only read-only exports are allowed (use TLS, or --insecure)',
        { addresses: bound.map(describeAddress) },
      );
    }
    this.log.info('NBD server listening', { addresses: bound.map(describeAddress), tls: tls ? tls.id : null });
  }

  /** Adds a listener to the running server (lockstep's x-nbd-server-listen). */
  async addListener(addr: SocketAddress): Promise<void> {
    const server = this.server;
    if (!server) throw new StateError('NBD server not running');
    if (addr.type === 'inet' && !isLoopbackHost(addr.host) && !this.insecure) {
      throw new InvalidArgumentError(`Refusing to listen on ${describeAddress(addr)} without TLS (use --insecure)`);
    }
    try {
      const b = await server.listen(addr);
      this.serverAddresses.push(addr.type === 'inet' && b.type === 'inet' ? { type: 'inet', host: addr.host, port: b.port } : addr);
    } catch (e) {
      throw new InvalidArgumentError(`Failed to listen on ${describeAddress(addr)}: ${(e as Error).message}`);
    }
    this.log.info('NBD server listening', { addresses: this.serverAddresses.map(describeAddress) });
  }

  async stopNbd(): Promise<void> {
    const server = this.server;
    if (!server) throw new StateError('NBD server not running');
    for (const e of [...this.exportsById.values()]) this.forget(e);
    this.server = null;
    this.serverAddresses = [];
    this.releaseCreds?.();
    this.releaseCreds = null;
    await server.close();
    this.log.info('NBD server stopped');
  }

  add(o: { id: string; nodeName: string; name?: string; writable: boolean; description?: string }): ExportInfo {
    if (this.exportsById.has(o.id)) throw new InvalidArgumentError(`Block export id '${o.id}' is already in use`);
    // QEMU's blk_exp_add: a node name only (nbd-server-add resolves its device first), and
    // looked up before the NBD server's own checks
    const node = this.graph.lookup(o.nodeName);
    if (!node || node.name !== o.nodeName) throw new NotFoundError(`Cannot find device='' nor node-name='${o.nodeName}'`);
    const server = this.server;
    if (!server) throw new StateError('NBD server not running');
    const name = o.name ?? o.nodeName;
    if (name.length > 4096) throw new InvalidArgumentError(`export name '${name.slice(0, 64)}...' too long`);
    for (const e of this.exportsById.values()) {
      if (e.name === name) throw new InvalidArgumentError(`NBD server already has export named '${name}'`);
    }
    if (o.writable && this.exposedPlain && !this.insecure) {
      throw new InvalidArgumentError(
        `Refusing writable export '${name}': the NBD server listens on a non-loopback address without TLS (use tls-creds, a loopback address, or --insecure)`,
      );
    }
    if (o.writable && node.readOnly) throw new InvalidArgumentError('Cannot export read-only node as writable');
    server.addExport({ name, node, writable: o.writable, ...(o.description !== undefined ? { description: o.description } : {}) });
    const info: ExportInfo = {
      type: 'nbd',
      id: o.id,
      name,
      node,
      nodeName: node.name,
      writable: o.writable,
      ...(o.description !== undefined ? { description: o.description } : {}),
    };
    this.exportsById.set(o.id, info);
    this.log.info('export added', { id: o.id, name, node: node.name, writable: o.writable });
    return info;
  }

  async del(id: string, mode: 'safe' | 'hard' = 'safe'): Promise<void> {
    const e = this.exportsById.get(id);
    if (!e) throw new NotFoundError(`Export '${id}' is not found`);
    const server = this.server;
    if (server) await server.removeExport(e.name, mode);
    this.forget(e);
  }

  private forget(e: ExportInfo): void {
    this.exportsById.delete(e.id);
    this.events.emitEvent('BLOCK_EXPORT_DELETED', { id: e.id });
    this.log.info('export removed', { id: e.id });
  }

  list(): ExportInfo[] {
    return [...this.exportsById.values()];
  }

  /** query-block-exports */
  query(): Array<Record<string, unknown>> {
    return this.list().map((e) => ({ type: e.type, id: e.id, 'node-name': e.node.name, 'shutting-down': false }));
  }

  /** Shutdown: closes the server (it drains its connections); exports go with it. */
  async close(): Promise<void> {
    if (this.server) await this.stopNbd();
  }
}
