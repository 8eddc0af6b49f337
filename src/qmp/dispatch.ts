// The command table. A command is `{ name, args, handler(ctx, args, session) }`: `args` is a
// schema (schema/types.ts) checked before the handler runs, so handlers receive arguments
// that have QEMU's shape. Command groups live in commands/*.ts, each exporting an array of
// commands; the daemon registers the groups it wants (replication's group is one more array).
// A handler's argument type is derived from its schema (ArgsOf), so handlers read typed members.

import type { BlockGraph } from '../block/graph.js';
import type { Logger } from '../util/log.js';
import type { ExportTable } from './exports.js';
import type { ObjectTable } from './objects.js';
import { StateError } from '../errors.js';
import type { EventBus } from './events.js';
import type { IoCommandRunner } from './commands/hmp.js';
import type { JobManager } from '../jobs/job.js';
import { QmpError } from './errors.js';
import { validateArguments, type ArgsOf, type Fields, type TypeSpec } from './schema/types.js';
import type { LoopDelayMonitor } from '../util/loop-delay.js';

/** One client connection's monitor state. */
export interface QmpSession {
  readonly id: number;
  /** capabilities negotiated: commands run and events flow */
  negotiated: boolean;
  /** out-of-band execution enabled by qmp_capabilities {enable: ['oob']} */
  oob: boolean;
}

export interface QmpVersion {
  qemu: { major: number; minor: number; micro: number };
  package: string;
}

/** Collaborators the daemon wires in (src/daemon/wiring.ts); null when a daemon has none. */
export interface QmpServices {
  /** the graph's job manager (src/jobs), whose events the daemon forwards to the monitors */
  jobs: JobManager | null;
  /** the qemu-io command engine for human-monitor-command (src/cli/io-commands.ts) */
  runIoCommand: IoCommandRunner | null;
}

/** Everything a handler may use. Created once per daemon and shared by every monitor. */
export interface QmpContext {
  readonly graph: BlockGraph;
  readonly events: EventBus;
  readonly log: Logger;
  readonly dispatcher: Dispatcher;
  readonly exports: ExportTable;
  readonly objects: ObjectTable;
  readonly services: QmpServices;
  readonly version: QmpVersion;
  /** the daemon's event-loop delay histogram (x-query-event-loop-delay) */
  readonly loopDelay: LoopDelayMonitor;
  /** --insecure: allow plain TCP monitors and writable NBD servers on non-loopback addresses */
  readonly insecure: boolean;
  /** `quit`: the daemon shuts down gracefully once the reply is sent */
  requestShutdown(reason: string): void;
}

export type QmpHandler<A = Record<string, unknown>> = (ctx: QmpContext, args: A, session: QmpSession) => unknown;

export interface QmpCommand {
  readonly name: string;
  /** member table (or a union type) the arguments must match */
  readonly args: Fields | TypeSpec;
  /** runs with arguments `args` has accepted */
  readonly handler: QmpHandler;
  /** may run out of band (exec-oob) */
  readonly allowOob?: boolean;
}

export function command<const S extends Fields | TypeSpec>(name: string, args: S, handler: QmpHandler<ArgsOf<S>>, opts: { allowOob?: boolean } = {}): QmpCommand {
  // The one cast of arguments: execute() runs the handler only after validateArguments(args).
  return { name, args, handler: (ctx, a, session) => handler(ctx, a as ArgsOf<S>, session), ...opts };
}

export class Dispatcher {
  private readonly commands = new Map<string, QmpCommand>();

  register(cmds: readonly QmpCommand[]): this {
    for (const c of cmds) {
      if (this.commands.has(c.name)) throw new StateError(`QMP command '${c.name}' is registered twice`);
      this.commands.set(c.name, c);
    }
    return this;
  }

  get(name: string): QmpCommand | undefined {
    return this.commands.get(name);
  }

  names(): string[] {
    return [...this.commands.keys()];
  }

  /** Validates and runs a command; throws what the handler throws (mapped by errors.ts). */
  async execute(ctx: QmpContext, session: QmpSession, name: string, args: Record<string, unknown>): Promise<unknown> {
    const cmd = this.commands.get(name);
    if (!cmd) throw new QmpError('CommandNotFound', `The command ${name} has not been found`);
    validateArguments(cmd.args, args);
    const ret = await cmd.handler(ctx, args, session);
    return ret === undefined ? {} : ret;
  }
}
