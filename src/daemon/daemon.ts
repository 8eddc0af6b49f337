// The daemon: one block graph, its objects, NBD server and exports, QMP monitors. Start-up
// acts on the parsed options in command-line order and undoes what it did if an item fails;
// shut-down (SIGTERM, SIGINT, quit) stops accepting, drains, flushes and closes every node.

import { writeFileSync, unlinkSync } from 'node:fs';
import type { TlsOptions } from 'node:tls';
import { BlockGraph } from '../block/graph.js';
import { createRegistry, type DriverRegistry } from '../block/registry.js';
import { InvalidArgumentError, errorMessage } from '../errors.js';
import { Dispatcher, type QmpCommand, type QmpContext, type QmpServices, type QmpVersion } from '../qmp/dispatch.js';
import { EventBus } from '../qmp/events.js';
import { QmpServer } from '../qmp/server.js';
import { blockdevCommands } from '../qmp/commands/blockdev.js';
import { hmpCommands } from '../qmp/commands/hmp.js';
import { miscCommands } from '../qmp/commands/misc.js';
import { nbdCommands, toListenAddress } from '../qmp/commands/nbd.js';
import { jobCommands } from '../qmp/commands/jobs.js';
import { createCommands } from '../qmp/commands/create.js';
import { ExportTable, isLoopbackHost, type NbdServerFactory } from '../qmp/exports.js';
import { Logger } from '../util/log.js';
import { LoopDelayMonitor } from '../util/loop-delay.js';
import { ObjectTable, tlsServerOptions } from '../qmp/objects.js';
import type { ChardevOptions, DaemonOptions } from './options.js';
import type { SocketAddress } from '../util/socket-address.js';

/** lockstep speaks QEMU 7.2's QMP dialect; the package string says who answers. */
export const LOCKSTEP_QMP_VERSION: QmpVersion = { qemu: { major: 7, minor: 2, micro: 0 }, package: 'lockstep 0.1.0' };

/** The command groups every daemon has; deps.commands adds more (jobs, replication). */
export function builtinCommandGroups(): Array<readonly QmpCommand[]> {
  return [miscCommands, blockdevCommands, nbdCommands, jobCommands, createCommands, hmpCommands];
}

export interface DaemonDeps {
  log: Logger;
  registry?: DriverRegistry;
  nbdFactory: NbdServerFactory | null;
  /** extra command groups (replication) and the services they use */
  commands?: ReadonlyArray<readonly QmpCommand[]>;
  services?: Partial<QmpServices>;
  /** called once the graph exists, to create services that need it (the job manager) */
  setup?: (d: Daemon) => void | Promise<void>;
  /** extra shut-down work before exports and nodes close (cancel jobs) */
  beforeClose?: (d: Daemon) => Promise<void>;
}

export class Daemon {
  readonly graph: BlockGraph;
  readonly events = new EventBus();
  readonly dispatcher = new Dispatcher();
  readonly objects: ObjectTable;
  readonly exports: ExportTable;
  readonly qmp: QmpServer;
  readonly ctx: QmpContext;
  readonly log: Logger;
  readonly services: QmpServices;
  readonly loopDelay = new LoopDelayMonitor();
  /** resolves with the exit code once the daemon has shut down */
  readonly done: Promise<number>;
  private resolveDone!: (code: number) => void;
  private shuttingDown: Promise<void> | null = null;
  private shutdownRequested = false;
  private monitorAddrs: SocketAddress[] = [];
  private pidfileWritten = false;

  constructor(
    readonly opts: DaemonOptions,
    private readonly deps: DaemonDeps,
  ) {
    this.log = deps.log;
    this.graph = new BlockGraph(deps.registry ?? createRegistry());
    this.graph.on('error-log', (msg: string) => this.log.error(msg));
    // events raised by drivers (QUORUM_REPORT_BAD, QUORUM_FAILURE) reach every monitor
    this.graph.on('event', (name: string, data?: Record<string, unknown>) => this.events.emitEvent(name, data));
    this.objects = new ObjectTable(this.graph);
    this.exports = new ExportTable(this.graph, this.objects, this.events, this.log, deps.nbdFactory, opts.insecure);
    this.services = { jobs: null, runIoCommand: null, ...deps.services };
    for (const group of builtinCommandGroups()) this.dispatcher.register(group);
    for (const group of deps.commands ?? []) this.dispatcher.register(group);
    this.ctx = {
      graph: this.graph,
      events: this.events,
      log: this.log,
      dispatcher: this.dispatcher,
      exports: this.exports,
      objects: this.objects,
      services: this.services,
      version: LOCKSTEP_QMP_VERSION,
      loopDelay: this.loopDelay,
      insecure: opts.insecure,
      requestShutdown: (reason) => {
        // QEMU sends SHUTDOWN before the reply to quit; the monitors close after the reply
        if (this.shuttingDown || this.shutdownRequested) return;
        this.shutdownRequested = true;
        this.events.emitEvent('SHUTDOWN', { guest: false, reason });
        setImmediate(() => void this.shutdown(reason, false));
      },
    };
    this.qmp = new QmpServer(this.ctx, opts.monitorIdleTimeout !== undefined ? { idleTimeoutMs: opts.monitorIdleTimeout * 1000 } : {});
    this.done = new Promise((r) => (this.resolveDone = r));
  }

  get monitorAddresses(): readonly SocketAddress[] {
    return this.monitorAddrs;
  }

  /** Runs the configured items in order; on failure closes what was opened and throws. */
  async start(): Promise<void> {
    try {
      await this.deps.setup?.(this);
      // Monitors open last: QEMU answers no command before start-up is complete, and a client
      // must never see a node whose open is still in progress.
      const items = [...this.opts.items.filter((i) => i.kind !== 'monitor'), ...this.opts.items.filter((i) => i.kind === 'monitor')];
      for (const item of items) {
        switch (item.kind) {
          case 'object': {
            const obj = this.objects.add(item.options);
            this.log.info('object added', { id: obj.id, type: obj.qomType });
            break;
          }
          case 'blockdev': {
            const node = await this.graph.open(item.options, { keyval: item.keyval, monitorOwned: true });
            this.log.info('node added', { node: node.name, driver: node.driver.name });
            break;
          }
          case 'nbd-server': {
            const o = item.options;
            const addr = o.addr as Record<string, unknown>;
            await this.exports.startNbd({
              addrs: [toListenAddress(addr.type as string, addr), ...(item.extraAddrs ?? [])],
              ...(o['tls-creds'] !== undefined ? { tlsCreds: o['tls-creds'] as string } : {}),
              ...(o['max-connections'] !== undefined ? { maxConnections: o['max-connections'] as number } : {}),
              ...(o['x-idle-timeout'] !== undefined ? { idleTimeout: o['x-idle-timeout'] as number } : {}),
            });
            break;
          }
          case 'export': {
            const o = item.options;
            if (o.type !== 'nbd') throw new InvalidArgumentError(`--export: export type '${o.type}' is not supported by lockstep`);
            this.exports.add({
              id: o.id as string,
              nodeName: o['node-name'] as string,
              ...(o.name !== undefined ? { name: o.name as string } : {}),
              writable: (o.writable as boolean | undefined) ?? false,
              ...(o.description !== undefined ? { description: o.description as string } : {}),
            });
            break;
          }
          case 'monitor':
            await this.startMonitor(this.opts.chardevs.get(item.options.chardev as string)!);
            break;
        }
      }
      if (this.opts.pidfile) {
        writeFileSync(this.opts.pidfile, `${process.pid}\n`);
        this.pidfileWritten = true;
      }
    } catch (e) {
      this.log.error('start-up failed', { error: errorMessage(e) });
      await this.shutdown('start-up-failed', false);
      throw e;
    }
    this.log.info('daemon ready', { pid: process.pid, monitors: this.monitorAddrs });
  }

  private async startMonitor(c: ChardevOptions): Promise<void> {
    let addr: SocketAddress;
    let tls: TlsOptions | undefined;
    let release: (() => void) | undefined;
    if (c.path !== undefined) {
      if (c.tlsCreds !== undefined) throw new InvalidArgumentError(`--chardev ${c.id}: TLS is only supported on TCP sockets`);
      addr = { type: 'unix', path: c.path };
    } else {
      const port = toListenAddress('inet', { host: c.host, port: c.port });
      addr = port;
      if (c.tlsCreds !== undefined) {
        tls = tlsServerOptions(this.objects.tlsCreds(c.tlsCreds, 'server'));
        release = this.objects.use(c.tlsCreds);
      } else if (!isLoopbackHost(port.type === 'inet' ? port.host : '')) {
        if (!this.opts.insecure) {
          throw new InvalidArgumentError(
            `--chardev ${c.id}: refusing a plain TCP monitor on non-loopback address ${c.host}: use tls-creds=ID, a loopback address, or --insecure`,
          );
        }
        this.log.warn('QMP monitor listens on a non-loopback address without TLS (--insecure): anyone on the network can control the daemon', {
          chardev: c.id,
          host: c.host,
        });
      }
    }
    if (c.wait) this.log.debug('chardev wait=on is ignored: lockstep never waits for a monitor client', { chardev: c.id });
    try {
      const bound = await this.qmp.listen(addr, { id: c.id, ...(tls ? { tls } : {}) });
      this.monitorAddrs.push(bound);
      this.log.info('QMP monitor listening', { chardev: c.id, address: bound, tls: c.tlsCreds ?? null });
    } catch (e) {
      release?.();
      const where = addr.type === 'unix' ? addr.path : `${addr.host}:${addr.port}`;
      throw new InvalidArgumentError(`--chardev ${c.id}: Failed to listen on ${where}: ${errorMessage(e)}`);
    }
  }

  /** Graceful shut-down; idempotent. Resolves `done` with 0 (or 1 when start-up failed). */
  shutdown(reason: string, emitEvent = true): Promise<void> {
    if (this.shuttingDown) return this.shuttingDown;
    this.shuttingDown = (async () => {
      this.log.info('shutting down', { reason });
      if (emitEvent && !this.shutdownRequested) this.events.emitEvent('SHUTDOWN', { guest: false, reason });
      await this.qmp.close().catch((e: unknown) => this.log.error('closing monitors', { error: errorMessage(e) }));
      if (this.deps.beforeClose) await this.deps.beforeClose(this).catch((e: unknown) => this.log.error('stopping jobs', { error: errorMessage(e) }));
      await this.exports.close().catch((e: unknown) => this.log.error('closing the NBD server', { error: errorMessage(e) }));
      for (const node of [...this.graph.nodes.values()]) {
        if (node.readOnly || !node.isOpen) continue;
        try {
          await node.flush();
        } catch (e) {
          this.log.error('flush failed', { node: node.name, error: errorMessage(e) });
        }
      }
      await this.graph.closeAll().catch((e: unknown) => this.log.error('closing nodes', { error: errorMessage(e) }));
      if (this.pidfileWritten && this.opts.pidfile) {
        try {
          unlinkSync(this.opts.pidfile);
        } catch {
          /* already gone */
        }
      }
      this.loopDelay.close();
      this.log.info('shut down', { reason });
      this.resolveDone(reason === 'start-up-failed' ? 1 : 0);
    })();
    return this.shuttingDown;
  }
}
