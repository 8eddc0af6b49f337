// The one place where the daemon picks up the parts built elsewhere: the NBD server, the
// block jobs, the qemu-io engine, qcow2 creation and the replication commands.

import type { DaemonDeps } from './daemon.js';
import type { Logger } from '../util/log.js';
import type { NbdServerApi, NbdServerConfig } from '../qmp/exports.js';
import { replicationCommands } from '../qmp/commands/replication.js';
import { pairStateCommands } from '../qmp/commands/pair-state.js';
import { outputGateCommands } from '../qmp/commands/output-gates.js';
import type { JobsApi } from '../qmp/commands/jobs.js';
import { NbdServer } from '../nbd/server/server.js';
import { serverTlsConfig } from '../nbd/tls.js';
import { runIoCommand } from '../cli/io-commands.js';
import { createQcow2 } from '../block/drivers/qcow2/create.js';
import { startBackup } from '../jobs/backup.js';
import { startMirror } from '../jobs/mirror.js';
import { startCommit } from '../jobs/commit.js';
import { startResync } from '../jobs/resync.js';
import { jobManagerOf } from '../replication/jobs.js';
import { errorMessage } from '../errors.js';

export interface Wiring {
  deps: DaemonDeps;
  createQcow2: ((filename: string, size: number) => Promise<void>) | null;
}

function nbdFactory(log: Logger) {
  return (cfg: NbdServerConfig): NbdServerApi => {
    const server = new NbdServer({
      graph: cfg.graph,
      ...(cfg.maxConnections !== undefined ? { maxConnections: cfg.maxConnections } : {}),
      ...(cfg.idleTimeout !== undefined ? { idleTimeoutMs: cfg.idleTimeout * 1000 } : {}),
      ...(cfg.tls ? { tls: serverTlsConfig(cfg.tls as Parameters<typeof serverTlsConfig>[0]) } : {}),
      log: (msg: string) => log.debug(msg),
    } as ConstructorParameters<typeof NbdServer>[0]);
    return server as unknown as NbdServerApi;
  };
}

export function wire(log: Logger): Wiring {
  return {
    deps: {
      log,
      nbdFactory: nbdFactory(log),
      commands: [replicationCommands, pairStateCommands, outputGateCommands],
      services: { runIoCommand: (backend, line, out) => runIoCommand(backend, line, out) },
      setup: (d) => {
        // one job manager per graph, shared with replication's internal jobs
        const manager = jobManagerOf(d.graph);
        manager.on('event', (name: string, data: Record<string, unknown>) => d.events.emitEvent(name, data));
        const api = { manager, startBackup, startMirror, startCommit, startResync } as unknown as JobsApi;
        d.services.jobs = api;
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
