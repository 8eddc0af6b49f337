// blockdev-create: starts a `create` job (src/jobs/create.ts) for driver `file` or `qcow2`.
// Replies `{}` at the point QEMU 7.2 replies (see the job's module comment); the job then
// stays concluded, with `error` in query-jobs if it failed, until job-dismiss.

import type { OptionDict } from '../../block/options.js';
import { StateError } from '../../errors.js';
import { startCreate, type CreateOptions, type PreallocMode } from '../../jobs/create.js';
import { jobManagerOf } from '../../replication/jobs.js';
import { command, type QmpCommand, type QmpContext } from '../dispatch.js';
import { QmpError } from '../errors.js';
import { parseBlockdevCreate } from '../schema/create.js';
import { ANY_DICT } from '../schema/types.js';

/** The checked wire options as the job's typed options (members absent stay absent). */
function toCreateOptions(driver: string, o: Record<string, unknown>): CreateOptions {
  const pick = <T>(key: string): T | undefined => o[key] as T | undefined;
  const defined = <T extends object>(x: T): T => Object.fromEntries(Object.entries(x).filter(([, v]) => v !== undefined)) as T;
  if (driver === 'file') {
    return defined({
      driver: 'file',
      filename: o['filename'] as string,
      size: o['size'] as number,
      preallocation: pick<PreallocMode>('preallocation'),
      nocow: pick<boolean>('nocow'),
      extentSizeHint: pick<number>('extent-size-hint'),
    }) as CreateOptions;
  }
  return defined({
    driver: 'qcow2',
    file: o['file'] as string | OptionDict,
    size: o['size'] as number,
    version: pick<'v2' | 'v3'>('version'),
    clusterSize: pick<number>('cluster-size'),
    backingFile: pick<string>('backing-file'),
    backingFmt: pick<string>('backing-fmt'),
    lazyRefcounts: pick<boolean>('lazy-refcounts'),
    refcountBits: pick<number>('refcount-bits'),
    preallocation: pick<PreallocMode>('preallocation'),
    extendedL2: pick<boolean>('extended-l2'),
    compressionType: pick<'zlib' | 'zstd'>('compression-type'),
    dataFile: pick<string | OptionDict>('data-file'),
    dataFileRaw: pick<boolean>('data-file-raw'),
    encrypt: pick<OptionDict>('encrypt'),
  }) as CreateOptions;
}

async function blockdevCreate(ctx: QmpContext, args: Record<string, unknown>): Promise<void> {
  const parsed = parseBlockdevCreate(args);
  // a driver without a creation branch exists in QEMU but cannot create
  if (parsed.noCreate) throw new QmpError('GenericError', 'Driver does not support blockdev-create');
  if (!ctx.services.jobs) throw new StateError('Block jobs are not available in this build');
  const job = await startCreate(jobManagerOf(ctx.graph), parsed.jobId, toCreateOptions(parsed.driver, parsed.options));
  ctx.log.info('create job started', { job: job.id, driver: parsed.driver });
}

export const createCommands: readonly QmpCommand[] = [command('blockdev-create', ANY_DICT, (ctx, args) => blockdevCreate(ctx, args))];
