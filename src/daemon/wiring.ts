// The one place where the daemon picks up the parts built elsewhere: the NBD server, the
// block jobs, qcow2 creation and the replication commands. The qemu-io engine belongs to the
// command line (src/cli/io-commands.ts): the caller hands it in, so imports run downwards.

import type { DaemonDeps } from './daemon.js';
import type { Logger } from '../util/log.js';
import type { NbdServerFactory } from '../qmp/exports.js';
import type { IoCommandRunner } from '../qmp/commands/hmp.js';
import { replicationCommands } from '../qmp/commands/replication.js';
import { pairStateCommands } from '../qmp/commands/pair-state.js';
import { outputGateCommands } from '../qmp/commands/output-gates.js';
import { NbdServer } from '../nbd/server/server.js';
import { serverTlsConfig } from '../nbd/tls.js';
import { createQcow2 } from '../block/drivers/qcow2/create.js';
import { jobManagerOf } from '../replication/jobs.js';
import { errorMessage } from '../errors.js';

export interface Wiring {
  deps: DaemonDeps;
  createQcow2: ((filename: string, size: number) => Promise<void>) | null;
}

function nbdFactory(log: Logger): NbdServerFactory {
  return (cfg) =>
    new NbdServer({
      graph: cfg.graph,
      ...(cfg.maxConnections !== undefined ? { maxConnections: cfg.maxConnections } : {}),
      ...(cfg.idleTimeout !== undefined ? { idleTimeoutMs: cfg.idleTimeout * 1000 } : {}),
      ...(cfg.tls ? { tls: serverTlsConfig(cfg.tls) } : {}),
      log: (msg: string) => log.debug(msg),
    });
}

/** `runIoCommand`: human-monitor-command's qemu-io engine (null: the command says it lacks one). */
export function wire(log: Logger, runIoCommand: IoCommandRunner | null = null): Wiring {
  return {
    deps: {
      log,
      nbdFactory: nbdFactory(log),
      commands: [replicationCommands, pairStateCommands, outputGateCommands],
      services: { runIoCommand },
      setup: (d) => {
        // one job manager per graph, shared with replication's internal jobs
        const manager = jobManagerOf(d.graph);
        manager.on('event', (name: string, data: Record<string, unknown>) => d.events.emitEvent(name, data));
        d.services.jobs = manager;
      },
      beforeClose: async (d) => {
        await jobManagerOf(d.graph)
          .cancelAll()
          .catch((e: unknown) => log.error('cancelling jobs', { error: errorMessage(e) }));
      },
    },
    createQcow2: (filename, size) => createQcow2(filename, { size }),
  };
}
