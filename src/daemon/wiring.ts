// The one place where the daemon picks up the parts built elsewhere (NBD server, jobs, the
// qemu-io engine, qcow2 creation, replication). Each is null until its branch is merged.

import type { DaemonDeps } from './daemon.js';
import type { Logger } from './log.js';
import { replicationCommands } from '../qmp/commands/replication.js';

export interface Wiring {
  deps: DaemonDeps;
  createQcow2: ((filename: string, size: number) => Promise<void>) | null;
}

export function wire(log: Logger): Wiring {
  return {
    deps: { log, nbdFactory: null, commands: [replicationCommands] },
    createQcow2: null,
  };
}
