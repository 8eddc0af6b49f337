// The `create` job behind blockdev-create (QEMU 7.2's block/create.c): formats a host file
// (driver `file`) or a node (driver `qcow2`) and stays concluded until job-dismiss.
//
// It is a plain job, not a block job: query-jobs lists it, query-block-jobs does not, its
// events are JOB_STATUS_CHANGE only, and progress goes 0/1 -> 1/1 whether it fails or not.
//
// When the reply comes: QEMU runs the job's coroutine at once, so a failure found before the
// first real I/O (a bad option, a missing node, a file that cannot be created) concludes the
// job before blockdev-create answers; anything later (resizing, writing) ends it after the
// answer. `startCreate` resolves at that same point (`firstYield`), so a monitor that answers
// once it resolves sends the events and the reply in QEMU's order.
//
// Options (QAPI BlockdevCreateOptions, already type-checked by the caller):
//   file:  filename, size, preallocation (off|falloc|full; metadata is refused as by QEMU),
//          nocow and extent-size-hint (accepted; Node.js cannot set either, QEMU ignores
//          failures to set them too)
//   qcow2: file (node-name or inline definition), size, version, cluster-size, backing-file,
//          backing-fmt, lazy-refcounts, refcount-bits, preallocation (off|metadata). lockstep
//          refuses extended-l2, data-file, encrypt, non-zlib compression and falloc/full
//          preallocation with a message that says so.

import { constants as fsConstants } from 'node:fs';
import { open as fsOpen, type FileHandle } from 'node:fs/promises';
import { BlockError, InvalidArgumentError, STRERROR, assert, errorCodeOf, isBlockError, strerror, type ErrorCode } from '../errors.js';
import { CREATE_TARGET_PERMS } from '../block/permissions.js';
import type { Backend } from '../block/backend.js';
import type { BlockNode } from '../block/node.js';
import type { OptionDict } from '../block/options.js';
import { checkQcow2Options, formatQcow2, type CreateQcow2Options } from '../block/drivers/qcow2/create.js';
import { nodeHostFile } from '../block/drivers/qcow2/host-file.js';
import { loadNative } from '../util/native.js';
import { acquireImageLock, type ImageLock } from '../block/drivers/file-lock.js';
import { Job, type JobManager } from './job.js';

export type PreallocMode = 'off' | 'metadata' | 'falloc' | 'full';

export interface FileCreateOptions {
  driver: 'file';
  filename: string;
  /** bytes; QEMU's uint64 arrives as a JSON integer, negative ones included */
  size: number;
  preallocation?: PreallocMode;
  nocow?: boolean;
  extentSizeHint?: number;
}

export interface Qcow2CreateOptions {
  driver: 'qcow2';
  /** a node-name, or an inline node definition opened for the job's duration */
  file: string | OptionDict;
  size: number;
  version?: 'v2' | 'v3';
  clusterSize?: number;
  backingFile?: string;
  backingFmt?: string;
  lazyRefcounts?: boolean;
  refcountBits?: number;
  preallocation?: PreallocMode;
  extendedL2?: boolean;
  compressionType?: 'zlib' | 'zstd';
  dataFile?: string | OptionDict;
  dataFileRaw?: boolean;
  encrypt?: OptionDict;
}

export type CreateOptions = FileCreateOptions | Qcow2CreateOptions;

/** Drivers that startCreate implements. */
export const CREATE_DRIVERS: readonly string[] = ['file', 'qcow2'];

const MiB = 1024 * 1024;
const UINT32_MAX = 0xffffffff;
/**
 * preallocation=full writes zeroes in chunks of this size (QEMU: 64 KiB, same bytes). Measured
 * here: 64 KiB pays a thread-pool round trip per chunk, and 1 MiB writes run into the
 * kernel's dirty-page throttling after a few hundred MiB; 256 KiB does neither.
 */
const ZERO_CHUNK = 256 * 1024;

/** A failure with QEMU's "what: strerror" message, keeping an errno-like code where known. */
function hostError(what: string, e: unknown): BlockError {
  return new BlockError(errorCodeOf(e), `${what}: ${strerror(e)}`, { cause: e });
}

export class CreateJob extends Job {
  readonly type = 'create' as const;
  /**
   * Resolves when the job first waits for I/O, or has concluded if it failed before: the
   * point where QEMU's blockdev-create answers.
   */
  readonly firstYield: Promise<void>;
  private yielded!: () => void;
  /** the node being formatted and the handle that keeps it while the job runs */
  private target: { node: BlockNode; backend: Backend; inline: boolean } | null = null;

  constructor(
    mgr: JobManager,
    jobId: string,
    readonly options: CreateOptions,
  ) {
    // QEMU: JOB_MANUAL_DISMISS; auto-finalize stays on
    super(mgr, { jobId, autoDismiss: false }, null);
    const signalled = new Promise<void>((r) => (this.yielded = r));
    this.firstYield = Promise.race([signalled, this.done.then(() => undefined)]);
  }

  override get isBlockJob(): boolean {
    return false;
  }

  /**
   * QEMU's first yield: lets startCreate resolve, then waits a macrotask so that a monitor
   * answering on that resolution (a chain of microtasks) has written its reply before the
   * job can emit anything more, even on a node whose I/O never leaves the event loop.
   */
  private async yieldPoint(): Promise<void> {
    this.yielded();
    await new Promise<void>((resolve) => setImmediate(resolve));
  }

  start(): void {
    this.created();
    this.startRunning();
  }

  protected async run(): Promise<void> {
    this.progressSetRemaining(1);
    try {
      if (this.options.driver === 'file') await this.createFile(this.options);
      else await this.createQcow2(this.options);
    } finally {
      this.progressAdd(1);
    }
  }

  protected override async clean(): Promise<void> {
    const t = this.target;
    if (!t) return;
    this.target = null;
    this.graph.releaseBackend(t.backend);
    // an inline node closes with its last user: wait, so its file is closed when we conclude
    if (t.inline) await this.graph.whenClosed(t.node);
  }

  // ---- file ---------------------------------------------------------------------------------

  private async createFile(o: FileCreateOptions): Promise<void> {
    const hint = o.extentSizeHint ?? MiB;
    // a negative hint is a huge unsigned one for QEMU
    if (hint < 0 || hint > UINT32_MAX) throw new InvalidArgumentError('Extent size hint is too large');
    let fh: FileHandle;
    try {
      fh = await fsOpen(o.filename, fsConstants.O_RDWR | fsConstants.O_CREAT, 0o644);
    } catch (e) {
      throw hostError(`Could not create '${o.filename}'`, e);
    }
    let lock: ImageLock | null = null;
    try {
      // QEMU takes the image locks before it empties the file: an image in use by a writer
      // (this process or another, QEMU included) is refused, never truncated under it
      try {
        lock = await acquireImageLock(fh, o.filename, false);
      } catch (e) {
        // QMP carries the error without its hint line ("Is another process using ...")
        throw new InvalidArgumentError((e as Error).message.split('\n')[0]!, { cause: e });
      }
      await this.yieldPoint();
      // empty it first, as QEMU does, so that no old data stays below the new size
      await truncateFile(fh, 0);
      await resizeFile(fh, o.size, o.preallocation ?? 'off', () => this.shouldStop);
    } finally {
      await lock?.release().catch(() => {});
      await fh.close().catch(() => {});
    }
  }

  // ---- qcow2 --------------------------------------------------------------------------------

  private async createQcow2(o: Qcow2CreateOptions): Promise<void> {
    let node: BlockNode;
    const inline = typeof o.file !== 'string';
    if (typeof o.file === 'string') {
      node = this.graph.find(o.file);
    } else {
      // QEMU opens an inline definition after its first yield
      await this.yieldPoint();
      node = await this.graph.open(o.file);
    }
    this.target = { node, backend: this.graph.createBackend(node, { perms: CREATE_TARGET_PERMS }), inline };

    const opts: CreateQcow2Options = { size: o.size, compat: o.version === 'v2' ? '0.10' : '1.1' };
    if (o.clusterSize !== undefined) opts.clusterSize = o.clusterSize;
    if (o.backingFile !== undefined) opts.backingFile = o.backingFile;
    if (o.backingFmt !== undefined) opts.backingFormat = o.backingFmt;
    if (o.lazyRefcounts !== undefined) opts.lazyRefcounts = o.lazyRefcounts;
    if (o.refcountBits !== undefined) opts.refcountBits = o.refcountBits;
    const prealloc = o.preallocation ?? 'off';
    if (prealloc === 'off' || prealloc === 'metadata') opts.preallocation = prealloc;
    checkQcow2Extras(o);
    checkQcow2Options(opts);
    checkUnsupported(o);
    checkWritable(node);

    await this.yieldPoint();
    await formatQcow2(nodeHostFile(node), opts);
  }
}

/** What QEMU checks of extended-l2 before the cluster size; lockstep then refuses it. */
function checkQcow2Extras(o: Qcow2CreateOptions): void {
  // a misaligned size is reported first, by checkQcow2Options
  if (!o.extendedL2 || ((o.size % 512) + 512) % 512 !== 0) return;
  if (o.version === 'v2') {
    throw new InvalidArgumentError('Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)');
  }
  if ((o.clusterSize ?? 65536) < 16384) throw new InvalidArgumentError('Extended L2 entries are only supported with cluster sizes of at least 16384 bytes');
  throw new InvalidArgumentError('Extended L2 entries are not supported by lockstep');
}

/** QEMU's checks that follow the refcount ones, then what lockstep cannot create. */
function checkUnsupported(o: Qcow2CreateOptions): void {
  const v2 = o.version === 'v2';
  if (o.dataFileRaw && o.dataFile === undefined) throw new InvalidArgumentError('data-file-raw requires data-file');
  if (o.dataFile !== undefined) {
    if (v2) throw new InvalidArgumentError('External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)');
    throw new InvalidArgumentError('External data files are not supported by lockstep');
  }
  if (o.compressionType !== undefined && o.compressionType !== 'zlib') {
    if (v2) throw new InvalidArgumentError('Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)');
    throw new InvalidArgumentError(`Compression type '${o.compressionType}' is not supported by lockstep`);
  }
  if (o.encrypt !== undefined) throw new InvalidArgumentError('Encrypted qcow2 images are not supported by lockstep');
  const prealloc = o.preallocation ?? 'off';
  if (prealloc !== 'off' && prealloc !== 'metadata') {
    throw new InvalidArgumentError(`Preallocation mode '${prealloc}' of qcow2 images is not supported by lockstep (use off or metadata)`);
  }
}

/**
 * QEMU's permission check for the creation's writer (it takes write and resize): a format
 * above the node refuses to share them, and a read-only node cannot grant them.
 */
function checkWritable(node: BlockNode): void {
  for (const edge of node.parents) {
    const p = edge.parent;
    if (!('driver' in p) || p.driver.kind !== 'format' || p.driver.name === 'raw') continue;
    throw new InvalidArgumentError(
      `Permission conflict on node '${node.name}': permissions 'write, resize' are both required by an unnamed block device ` +
        `(uses node '${node.name}' as 'root' child) and unshared by node '${p.name}' (uses node '${node.name}' as '${edge.role}' child).`,
    );
  }
  if (node.readOnly) throw new InvalidArgumentError('Block node is read-only');
}

// ---- host file helpers ----------------------------------------------------------------------

/** ftruncate with QEMU's message; sizes QEMU would see as negative (int64) fail with EINVAL. */
async function truncateFile(fh: FileHandle, size: number): Promise<void> {
  if (size < 0 || size >= 2 ** 63) throw hostError('Could not resize file', { code: 'EINVAL' });
  if (!Number.isSafeInteger(size)) throw hostError('Could not resize file', { code: 'EFBIG' });
  try {
    await fh.truncate(size);
  } catch (e) {
    throw hostError('Could not resize file', e);
  }
}

/**
 * QEMU's raw_regular_truncate: grows the (empty) file to `size` with `mode`. Writing zeroes
 * stops early when `stop` says so (a cancel at shutdown).
 */
async function resizeFile(fh: FileHandle, size: number, mode: PreallocMode, stop: () => boolean): Promise<void> {
  switch (mode) {
    case 'off':
      await truncateFile(fh, size);
      return;
    case 'falloc':
      await fallocate(fh, size, stop);
      return;
    case 'full':
      await truncateFile(fh, size);
      await writeZeroes(fh, 0, size, 'Could not write zeros for preallocation', stop);
      try {
        await fh.sync();
      } catch (e) {
        throw hostError('Could not flush file to disk', e);
      }
      return;
    default:
      throw new InvalidArgumentError(`Unsupported preallocation mode: ${mode}`);
  }
}

/** posix_fallocate over [0, size): fallocate(ZERO_RANGE) when the helper has it, else zeroes. */
async function fallocate(fh: FileHandle, size: number, stop: () => boolean): Promise<void> {
  if (size < 0 || !Number.isSafeInteger(size)) throw hostError('Could not preallocate new data', { code: size < 0 ? 'EINVAL' : 'EFBIG' });
  if (size === 0) return;
  const native = loadNative();
  if (native) {
    try {
      await native.zeroRange(fh.fd, 0, size);
      return;
    } catch (e) {
      if (!isBlockError(e, 'ENOTSUP')) throw hostError('Could not preallocate new data', e);
    }
  }
  // glibc's posix_fallocate writes where the filesystem cannot allocate
  await writeZeroes(fh, 0, size, 'Could not preallocate new data', stop);
}

async function writeZeroes(fh: FileHandle, offset: number, length: number, what: string, stop: () => boolean): Promise<void> {
  const zeroes = Buffer.alloc(Math.min(ZERO_CHUNK, Math.max(length, 1)));
  try {
    for (let pos = offset; pos < offset + length; ) {
      if (stop()) throw BlockError.canceled();
      const n = Math.min(zeroes.length, offset + length - pos);
      const { bytesWritten } = await fh.write(zeroes, 0, n, pos);
      assert(bytesWritten > 0, 'write made progress');
      pos += bytesWritten;
    }
  } catch (e) {
    if (isBlockError(e, 'ECANCELED')) throw e;
    throw hostError(what, e);
  }
}

/**
 * Starts a create job. Throws for a bad or taken job id (nothing started then). Resolves at
 * the job's first yield (see the module comment); the outcome is the job's `done`.
 */
export async function startCreate(mgr: JobManager, jobId: string, options: CreateOptions): Promise<CreateJob> {
  if (!CREATE_DRIVERS.includes(options.driver)) throw new InvalidArgumentError(`Driver '${String(options.driver)}' does not support blockdev-create in lockstep`);
  const job = new CreateJob(mgr, jobId, options);
  job.start();
  await job.firstYield;
  return job;
}
