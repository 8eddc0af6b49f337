// The one module-level table: a read-only map from driver name to driver, built from
// explicit imports (no registration by import side effect).

import type { BlockDriver } from './driver.js';
import { fileDriver } from './drivers/file.js';
import { memoryDriver } from './drivers/memory.js';
import { nbdDriver } from './drivers/nbd.js';
import { nullDriver } from './drivers/null.js';
import { rawDriver } from './drivers/raw.js';

export type DriverRegistry = ReadonlyMap<string, BlockDriver>;

export function createRegistry(extra: BlockDriver[] = []): DriverRegistry {
  const all: BlockDriver[] = [fileDriver, memoryDriver, nbdDriver, nullDriver, rawDriver, ...extra];
  return new Map(all.map((d) => [d.name, d]));
}
