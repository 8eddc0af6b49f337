// The backup job: a copy-before-write filter above `source` keeps the target a point-in-time
// copy (every cluster's old content goes to the target before it is overwritten), and for
// sync=full|top a background copy fills in the rest:
//   none  - nothing in the background; the job runs until cancelled (replication, fleecing)
//   full  - every cluster
//   top   - the clusters allocated in the source's own layer
// The filter is dropped again when the job ends, whatever the outcome, restoring the
// source's parents. checkpoint() (sync=none only) resets the copy bitmap to all-set with
// no write or copy in flight (replication's do_checkpoint: decision 5 in docs/replication.md).

import { InvalidArgumentError, StateError } from '../errors.js';
import type { BlockNode } from '../block/node.js';
import { getCopyBeforeWrite, type CopyBeforeWrite } from '../block/filters/copy-before-write.js';
import type { Bitmap } from '../util/bitmap.js';
import { WATCH_PERMS } from '../block/permissions.js';
import { Job, type JobManager, type JobOptions, type JobType } from './job.js';
import { checkOnError, insertFilterDrained } from './filter-insert.js';

export type BackupSync = 'none' | 'full' | 'top';

export interface BackupOptions extends JobOptions {
  source: BlockNode;
  target: BlockNode;
  sync: BackupSync;
  /** the filter's x-copy-unit (replication's pair overlays); default QEMU's unit */
  copyUnit?: number;
}

export class BackupJob extends Job {
  readonly type: JobType = 'backup';
  readonly source: BlockNode;
  readonly target: BlockNode;
  readonly sync: BackupSync;
  private readonly copyUnit: number | undefined;
  /** the copy-before-write node, in the graph while the job runs */
  filter!: BlockNode;
  cbw!: CopyBeforeWrite;
  private filterInserted = false;

  constructor(mgr: JobManager, opts: BackupOptions) {
    super(mgr, opts, opts.source);
    this.source = opts.source;
    this.target = opts.target;
    this.sync = opts.sync;
    this.copyUnit = opts.copyUnit;
  }

  /** The copy bitmap: set = not copied since the last checkpoint. */
  get bitmap(): Bitmap {
    return this.cbw.bitmap;
  }
  get clusterSize(): number {
    return this.cbw.clusterSize;
  }
  /** Clusters copied since the start or the last checkpoint. */
  get copiedClusters(): number {
    return this.bitmap.bits - this.bitmap.count;
  }
  /**
   * Clusters not yet copied since the start or the last checkpoint: the bitmap's set bits,
   * the copy-before-write node's 'dirty-clusters' on the wire (query-replication's
   * 'dirty-clusters' is the other count, copiedClusters).
   */
  get uncopiedClusters(): number {
    return this.bitmap.count;
  }
  /** Bytes copied since the job started. */
  get bytesCopied(): number {
    return this.cbw.copy.copiedBytes;
  }

  /** Opens and inserts the filter; the job is then registered. */
  async setUp(): Promise<void> {
    const graph = this.graph;
    try {
      this.filter = await graph.open({
        driver: 'copy-before-write',
        file: this.source.name,
        target: this.target.name,
        ...(this.copyUnit !== undefined ? { 'x-copy-unit': this.copyUnit } : {}),
      });
    } catch (e) {
      // QEMU's bdrv_insert_node
      if (e instanceof Error) e.message = `Could not create node: ${e.message}`;
      throw e;
    }
    try {
      this.cbw = getCopyBeforeWrite(this.filter);
      this.cbw.shareSourceWrite = this.internal;
      const inserted = insertFilterDrained(this.filter, this.source); // throws: not inserted
      this.filterInserted = true;
      await inserted;
      // QEMU's block_job_create on the filter: a parent taking nothing, so the filter's own
      // rules on its source apply (nobody else writes it: the target may be above it)
      this.use(this.filter, WATCH_PERMS, 'main node');
    } catch (e) {
      if (this.filterInserted) graph.dropFilter(this.filter);
      else graph.collect(this.filter);
      this.filterInserted = false;
      await graph.settle();
      throw e;
    }
    // sync=none has no planned work: each copy a write triggers is both new work and done
    if (this.sync === 'none') {
      this.cbw.copy.onCopied = (n) => {
        this.progressAddRemaining(n);
        this.progressAdd(n);
      };
    }
  }

  async start(): Promise<void> {
    try {
      if (!this.internal) {
        this.source.checkNotBlocked();
        this.target.checkNotBlocked();
        // blocked before the first await: a concurrent start sees the nodes busy
        this.block(this.source);
        this.block(this.target);
      }
      // QEMU's backup_job_create: after the nodes' blockers, before the filter (a read-only
      // target is refused by the filter's permissions on it)
      if (this.source.getLength() !== this.target.getLength()) throw new InvalidArgumentError('Source and target image have different sizes');
      await this.setUp();
      if (!this.internal) {
        // QEMU's backup blocks its filter and target, not the source below the filter (a
        // blockdev-del of the source is then refused as a node in use)
        this.unblock(this.source);
        this.block(this.filter);
      }
    } catch (e) {
      this.abandon();
      throw e;
    }
    this.created();
    this.startRunning();
  }

  protected async run(): Promise<void> {
    if (this.sync === 'none') {
      while (!this.shouldStop) {
        await this.pausePoint();
        if (this.shouldStop) break;
        await this.sleep(Infinity);
      }
      return;
    }
    if (this.sync === 'top') await this.markAllocatedOnly();
    this.progressSetRemaining(this.cbw.copy.remainingBytes);
    await this.cbw.copy.run(this, async () => 'stop');
  }

  /** sync=top: only clusters allocated in the source's own layer are copied. */
  private async markAllocatedOnly(): Promise<void> {
    const bm = this.bitmap;
    const mark = new Uint8Array(bm.bits);
    const len = this.source.getLength();
    for (let pos = 0; pos < len; ) {
      const s = await this.source.blockStatus(pos, len - pos);
      if (s.allocated) {
        const [a, b] = bm.bitSpan(pos, s.length);
        mark.fill(1, a, b);
      }
      pos += s.length;
    }
    // Clusters copied by guest writes meanwhile are already clear; clear the rest.
    for (let i = 0; i < bm.bits; i++) if (!mark[i]) bm.setBits(i, i + 1, false);
  }

  /**
   * Replication's checkpoint (sync=none): waits for in-flight writes and copies, holds
   * new writes, resets the copy bitmap to all-set, runs `during` (replication empties the
   * active and hidden disks there: decision 5 in docs/replication.md), releases. A failure of `during` is
   * thrown after the release; the bitmap is reset by then.
   */
  async checkpoint(during?: () => Promise<void>): Promise<void> {
    if (this.sync !== 'none') throw new StateError('The backup job only supports block checkpoint in sync=none mode');
    if (this.isCompleted) throw new StateError('Backup job was cancelled unexpectedly');
    await this.cbw.checkpoint(during);
  }

  protected override async clean(): Promise<void> {
    if (!this.filterInserted) return;
    this.filterInserted = false;
    // Quiesce so that no copy is half done when the filter goes away.
    await this.cbw.quiesce(() => {
      this.cbw.active = false;
      this.graph.dropFilter(this.filter);
    });
    // not graph.settle(): this may run inside the close of a node above (replication)
    await this.graph.whenClosed(this.filter);
  }
}

/**
 * Starts a backup job. The filter is in the graph when this resolves.
 * Throws InvalidArgumentError/StateError for bad arguments (nothing changed then).
 */
export async function startBackup(mgr: JobManager, opts: BackupOptions): Promise<BackupJob> {
  if (!['none', 'full', 'top'].includes(opts.sync)) throw new InvalidArgumentError(`Parameter 'sync' does not accept value '${String(opts.sync)}'`);
  checkOnError('on-source-error', opts.onSourceError);
  checkOnError('on-target-error', opts.onTargetError);
  if (opts.source === opts.target) throw new InvalidArgumentError('Source and target cannot be the same');
  const job = new BackupJob(mgr, opts);
  await job.start();
  return job;
}
