// The one place where the daemon picks up the parts built elsewhere (NBD server, jobs, the
// qemu-io engine, qcow2 creation; replication joins here: a command group in deps.commands
// and its manager created in setup).

import { JobManager } from '../jobs/job.js';
import { jobManagerOf } from '../replication/jobs.js';
import { startBackup } from '../jobs/backup.js';
import { startMirror } from '../jobs/mirror.js';
import { startCommit } from '../jobs/commit.js';
import { runIoCommand } from '../cli/io-commands.js';
import { NbdServer } from '../nbd/server/server.js';
import { serverTlsConfig } from '../nbd/tls.js';
import { createQcow2 } from '../block/drivers/qcow2/create.js';
import { replicationCommands } from '../qmp/commands/replication.js';
import type { DaemonDeps } from './daemon.js';
import type { Logger } from './log.js';

export interface Wiring {
  deps: DaemonDeps;
  createQcow2: ((filename: string, size: number) => Promise<void>) | null;
}

export function wire(log: Logger): Wiring {
  return {
    deps: {
      log,
      nbdFactory: (cfg) =>
        new NbdServer({
          graph: cfg.graph,
          ...(cfg.maxConnections !== undefined ? { maxConnections: cfg.maxConnections } : {}),
          ...(cfg.tls ? { tls: serverTlsConfig(cfg.tls) } : {}),
          log: (msg) => log.warn('nbd', { detail: msg }),
        }),
      commands: [replicationCommands],
      services: { runIoCommand },
      setup: (d) => {
        // the graph's one job manager, shared with replication (graph.services 'jobs')
        const mgr = jobManagerOf(d.graph);
        mgr.on('event', (name: string, data: Record<string, unknown>) => d.events.emitEvent(name, data));
        d.services.jobs = { manager: mgr, startBackup, startMirror, startCommit };
      },
      beforeClose: async (d) => {
        const mgr = d.services.jobs?.manager;
        if (mgr instanceof JobManager) await mgr.cancelAll();
      },
    },
    createQcow2: (filename, size) => createQcow2(filename, { size }),
  };
}
