// Block job commands: blockdev-backup, blockdev-mirror, drive-mirror, block-commit,
// query-block-jobs, query-jobs, block-job-* verbs and job-* verbs. The jobs themselves are
// src/jobs; the graph's JobManager comes from the daemon (ctx.services.jobs, wired in
// src/daemon/wiring.ts), and job events reach the monitors through it (JobManager 'event' ->
// EventBus).

import type { BlockNode } from '../../block/node.js';
import { InvalidArgumentError, NotFoundError, StateError } from '../../errors.js';
import { startBackup, type BackupSync } from '../../jobs/backup.js';
import { startCommit } from '../../jobs/commit.js';
import { deviceName, type Job, type JobManager, type JobOptions } from '../../jobs/job.js';
import { startMirror } from '../../jobs/mirror.js';
import { startResync } from '../../jobs/resync.js';
import { nbdFilenameOptions } from '../../nbd/uri.js';
import { command, type QmpCommand, type QmpContext } from '../dispatch.js';
import { QmpError } from '../errors.js';
import { BLOCK_COMMIT, BLOCKDEV_BACKUP, BLOCKDEV_MIRROR, DRIVE_MIRROR, X_BLOCKDEV_RESYNC } from '../schema/block.js';
import { BLOCK_JOB_CANCEL, BLOCK_JOB_DEVICE, BLOCK_JOB_SET_SPEED, JOB_ID } from '../schema/job.js';
import { NO_ARGS } from '../schema/misc.js';
import type { ArgsOf } from '../schema/types.js';
import { findDevice } from './blockdev.js';

function jobs(ctx: QmpContext): JobManager {
  const m = ctx.services.jobs;
  if (!m) throw new StateError('Block jobs are not available in this build');
  return m;
}

/** block-job-* name a job by id; QEMU answers DeviceNotActive when there is none. */
function blockJob(ctx: QmpContext, id: string): Job {
  try {
    return jobs(ctx).findBlockJob(id);
  } catch (e) {
    if (e instanceof NotFoundError) throw new QmpError('DeviceNotActive', e.message);
    throw e;
  }
}

/** Without job-id, QEMU names the job after the device; a bare node has none. */
function checkJobId(args: Record<string, unknown>, node: BlockNode): void {
  if (args['job-id'] === undefined && deviceName(node) === undefined) throw new InvalidArgumentError(`Invalid job ID ''`);
}

/** The job options every job command shares, as its schema types them. */
type CommonArgs = Pick<ArgsOf<typeof BLOCKDEV_BACKUP>, 'job-id' | 'speed' | 'auto-finalize' | 'auto-dismiss' | 'on-source-error' | 'on-target-error'>;

function common(args: CommonArgs): JobOptions {
  const o: JobOptions = {};
  if (args['job-id'] !== undefined) o.jobId = args['job-id'];
  if (args.speed !== undefined) {
    if (args.speed < 0) throw new InvalidArgumentError(`Parameter 'speed' expects a non-negative value`);
    o.speed = args.speed;
  }
  if (args['auto-finalize'] !== undefined) o.autoFinalize = args['auto-finalize'];
  if (args['auto-dismiss'] !== undefined) o.autoDismiss = args['auto-dismiss'];
  if (args['on-source-error'] !== undefined) o.onSourceError = args['on-source-error'];
  if (args['on-target-error'] !== undefined) o.onTargetError = args['on-target-error'];
  return o;
}

function refuse(args: Record<string, unknown>, names: string[]): void {
  for (const n of names) {
    const v = args[n];
    if (v !== undefined && v !== false) throw new InvalidArgumentError(`Parameter '${n}' is not supported by lockstep`);
  }
}

/**
 * QEMU mirrors only root nodes (a node with node parents would see its parents bypassed);
 * a node a job holds is not a root either (QEMU's bdrv_is_root_node: only BlockBackends).
 */
function checkRoot(node: BlockNode): void {
  if (node.parentNodes().length > 0 || node.jobHolds.size > 0) throw new InvalidArgumentError('Need a root block node');
}

/** QEMU's granularity checks and messages (0 means the default). */
function granularity(args: { granularity?: number }): { granularity?: number } {
  const g = args.granularity;
  if (g === undefined || g === 0) return {};
  if (g < 512 || g > 64 * 1024 * 1024) throw new InvalidArgumentError(`Parameter 'granularity' expects a value in range [512B, 64MB]`);
  if ((g & (g - 1)) !== 0) throw new InvalidArgumentError(`Parameter 'granularity' expects a power of 2`);
  return { granularity: g };
}

function checkSync(sync: ArgsOf<typeof BLOCKDEV_BACKUP>['sync']): BackupSync {
  if (sync === 'incremental' || sync === 'bitmap') throw new InvalidArgumentError(`Sync mode '${sync}' is not supported by lockstep (no persistent dirty bitmaps)`);
  return sync;
}

/**
 * drive-mirror's target: a filename or one of QEMU's NBD filenames (nbd/uri.ts: `nbd://`,
 * `nbd+tcp://`, `nbd+unix:///EXPORT?socket=PATH`, the legacy `nbd:` syntax), opened as a node
 * of `format` (raw by default). Any other URI, TLS ones included (they need a tls-creds
 * object, which a target string cannot name), is refused.
 */
export function driveTargetOptions(target: string, format: string | undefined, nodeName: string | undefined): Record<string, unknown> {
  const scheme = /^([a-z+]+):\/\//.exec(target)?.[1];
  const tls = scheme !== undefined && (scheme === 'nbds' || scheme.startsWith('nbds+'));
  const nbd = tls ? null : nbdFilenameOptions(target);
  if (!nbd && scheme !== undefined) {
    throw new InvalidArgumentError(`Unsupported target URI '${target}' (nbd://HOST:PORT/EXPORT, nbd+unix:///EXPORT?socket=PATH or a file name)`);
  }
  const file = nbd ?? { driver: 'file', filename: target };
  return { driver: format ?? 'raw', file, ...(nodeName !== undefined ? { 'node-name': nodeName } : {}) };
}

/** Closes an implicit node (drive-mirror's target) once its job has ended and let it go. */
function releaseWhenDone(ctx: QmpContext, job: Job, node: BlockNode): void {
  void job.done.then(
    () => ctx.graph.collect(node),
    () => ctx.graph.collect(node),
  );
}

async function driveMirror(ctx: QmpContext, args: ArgsOf<typeof DRIVE_MIRROR>): Promise<void> {
  const source = ctx.graph.find(args.device);
  checkRoot(source);
  refuse(args, ['replaces', 'filter-node-name', 'buf-size']);
  const mode = args.mode ?? 'absolute-paths';
  if (mode !== 'existing') {
    throw new InvalidArgumentError(`drive-mirror mode '${mode}' (create the target image) is not supported by lockstep: create the target and use mode=existing`);
  }
  if (args['copy-mode'] === 'write-blocking') throw new InvalidArgumentError(`copy-mode 'write-blocking' is not supported by lockstep`);
  const sync = checkSync(args.sync);
  checkJobId(args, source);
  const target = await ctx.graph.open(driveTargetOptions(args.target, args.format, args['node-name']));
  let job: Job;
  try {
    job = await startMirror(jobs(ctx), {
      ...common(args),
      source,
      target,
      sync,
      mode: 'existing',
      ...granularity(args),
    });
  } catch (e) {
    ctx.graph.collect(target);
    await ctx.graph.settle();
    throw e;
  }
  releaseWhenDone(ctx, job, target);
}

function resolveLayer(chainTop: BlockNode, nodeName: string | undefined, filename: string | undefined, what: 'top' | 'base', ctx: QmpContext): BlockNode | null {
  if (nodeName !== undefined && filename !== undefined) throw new InvalidArgumentError(`'${what}' and '${what}-node' are mutually exclusive`);
  // QEMU's bdrv_lookup_bs(NULL, name): node names only
  if (nodeName !== undefined) {
    const n = ctx.graph.lookup(nodeName);
    if (!n || n.name !== nodeName) throw new NotFoundError(`Cannot find device='' nor node-name='${nodeName}'`);
    return n;
  }
  if (filename !== undefined) {
    for (let n: BlockNode | null = chainTop; n; n = n.backing ?? n.filtered) {
      if (n.filename === filename || n.file?.filename === filename) return n;
    }
    throw new InvalidArgumentError(`${what === 'top' ? 'Top' : 'Base'} image file ${filename} not found`);
  }
  return null;
}

async function blockCommit(ctx: QmpContext, args: ArgsOf<typeof BLOCK_COMMIT>): Promise<void> {
  const device = findDevice(ctx, args.device);
  checkRoot(device);
  checkJobId(args, device);
  refuse(args, ['backing-file', 'filter-node-name']);
  const top = resolveLayer(device, args['top-node'], args.top, 'top', ctx) ?? device;
  let base = resolveLayer(device, args['base-node'], args.base, 'base', ctx);
  if (!base) {
    base = top;
    for (let n = top.backing ?? top.filtered; n; n = n.backing ?? n.filtered) base = n;
  }
  await startCommit(jobs(ctx), {
    ...(args['job-id'] !== undefined ? { jobId: args['job-id'] } : {}),
    top,
    base,
    active: top === device,
    autoComplete: false,
    ...(args.speed !== undefined ? { speed: args.speed } : {}),
    ...(args['on-error'] !== undefined ? { onError: args['on-error'] } : {}),
    ...(args['auto-finalize'] !== undefined ? { autoFinalize: args['auto-finalize'] } : {}),
    ...(args['auto-dismiss'] !== undefined ? { autoDismiss: args['auto-dismiss'] } : {}),
  });
}

export const jobCommands: readonly QmpCommand[] = [
  command('blockdev-backup', BLOCKDEV_BACKUP, async (ctx, args) => {
    const source = ctx.graph.find(args.device);
    const target = ctx.graph.find(args.target);
    refuse(args, ['bitmap', 'compress', 'filter-node-name', 'x-perf']);
    checkJobId(args, source);
    await startBackup(jobs(ctx), { ...common(args), source, target, sync: checkSync(args.sync) });
  }),
  command('blockdev-mirror', BLOCKDEV_MIRROR, async (ctx, args) => {
    // QEMU's qmp_get_root_bs: the source must be a root before the target is looked up
    const source = ctx.graph.find(args.device);
    checkRoot(source);
    const target = ctx.graph.find(args.target);
    // QEMU's blockdev_mirror_common: the op blockers first (a backing node is blocked)
    source.checkNotBlockedOrBacking();
    target.checkNotBlockedOrBacking();
    refuse(args, ['replaces', 'filter-node-name', 'buf-size']);
    checkJobId(args, source);
    if (args['copy-mode'] === 'write-blocking') throw new InvalidArgumentError(`copy-mode 'write-blocking' is not supported by lockstep`);
    await startMirror(jobs(ctx), {
      ...common(args),
      source,
      target,
      sync: checkSync(args.sync),
      mode: 'existing',
      ...granularity(args),
    });
  }),
  command('drive-mirror', DRIVE_MIRROR, (ctx, args) => driveMirror(ctx, args)),
  command('block-commit', BLOCK_COMMIT, (ctx, args) => blockCommit(ctx, args)),
  // lockstep: copies exactly the listed ranges (the pair's incremental and full resync)
  command('x-blockdev-resync', X_BLOCKDEV_RESYNC, async (ctx, args) => {
    const source = ctx.graph.find(args.device);
    const target = ctx.graph.find(args.target);
    await startResync(jobs(ctx), {
      ...common(args),
      source,
      target,
      extents: args.extents,
      ...(args['target-is-zero'] !== undefined ? { targetIsZero: args['target-is-zero'] } : {}),
      ...(args['flush-bytes'] !== undefined ? { flushBytes: args['flush-bytes'] } : {}),
    });
  }),
  command('query-block-jobs', NO_ARGS, (ctx) => jobs(ctx).queryBlockJobs()),
  command('query-jobs', NO_ARGS, (ctx) => jobs(ctx).queryJobs()),
  command('block-job-cancel', BLOCK_JOB_CANCEL, (ctx, args) => {
    blockJob(ctx, args.device).userCancel(args.force ?? false);
  }),
  command('block-job-complete', BLOCK_JOB_DEVICE, (ctx, args) => blockJob(ctx, args.device).complete()),
  command('block-job-pause', BLOCK_JOB_DEVICE, (ctx, args) => blockJob(ctx, args.device).pause()),
  command('block-job-resume', BLOCK_JOB_DEVICE, (ctx, args) => blockJob(ctx, args.device).resume()),
  command('block-job-set-speed', BLOCK_JOB_SET_SPEED, (ctx, args) => {
    const job = blockJob(ctx, args.device);
    if (args.speed < 0) throw new InvalidArgumentError(`Parameter 'speed' expects a non-negative value`);
    job.setSpeed(args.speed);
  }),
  command('block-job-finalize', JOB_ID, async (ctx, args) => {
    await blockJob(ctx, args.id).finalize();
  }),
  command('block-job-dismiss', JOB_ID, (ctx, args) => blockJob(ctx, args.id).dismiss()),
  command('job-cancel', JOB_ID, (ctx, args) => jobs(ctx).find(args.id).userCancel(false)),
  command('job-pause', JOB_ID, (ctx, args) => jobs(ctx).find(args.id).pause()),
  command('job-resume', JOB_ID, (ctx, args) => jobs(ctx).find(args.id).resume()),
  command('job-complete', JOB_ID, (ctx, args) => jobs(ctx).find(args.id).complete()),
  command('job-dismiss', JOB_ID, (ctx, args) => jobs(ctx).find(args.id).dismiss()),
  command('job-finalize', JOB_ID, async (ctx, args) => {
    await jobs(ctx).find(args.id).finalize();
  }),
];
