// The one module-level table: a read-only map from driver name to driver, built from
// explicit imports (no registration by import side effect).

import type { BlockDriver } from './driver.js';
import { fileDriver } from './drivers/file.js';
import { memoryDriver } from './drivers/memory.js';
import { nbdDriver } from './drivers/nbd.js';
import { nullDriver } from './drivers/null.js';
import { rawDriver } from './drivers/raw.js';
import { quorumDriver } from './drivers/quorum.js';
import { qcow2Driver } from './drivers/qcow2/index.js';
import { copyBeforeWriteDriver } from './filters/copy-before-write.js';
import { blkdebugDriver } from './filters/blkdebug.js';
import { dirtyLogDriver } from './filters/dirty-log.js';
import { commitTopDriver, mirrorTopDriver } from './filters/job-top.js';
import { replicationDriver } from './filters/replication/filter.js';

export type DriverRegistry = ReadonlyMap<string, BlockDriver>;

export function createRegistry(extra: BlockDriver[] = []): DriverRegistry {
  const all: BlockDriver[] = [
    fileDriver,
    memoryDriver,
    nbdDriver,
    nullDriver,
    rawDriver,
    qcow2Driver,
    quorumDriver,
    replicationDriver,
    copyBeforeWriteDriver,
    blkdebugDriver,
    dirtyLogDriver,
    mirrorTopDriver,
    commitTopDriver,
    ...extra,
  ];
  return new Map(all.map((d) => [d.name, d]));
}
