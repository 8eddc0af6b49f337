// Output commit in the pair (issue 16): the primary's served node holds flush and FUA
// completions until a checkpoint covers them (src/replication/flush-commit.ts). The
// supervisor turns it on, releases the completions inside each checkpoint's barrier once the
// secondary has checkpointed, and starts a checkpoint as soon as the daemon says flushes wait
// (X_BLOCK_FLUSH_PENDING) instead of waiting for the interval: flushes arriving close
// together share that checkpoint (group commit). With the secondary gone (degraded) it is
// turned off, so that the primary's clients go on: there is nothing left to fail over to.

import type { PairCore } from './core.js';
import type { Side } from './sides.js';
import { DISK_NODE } from './setup.js';

export class PairOutputCommit {
  /** releases the daemon has counted, from the last release's reply */
  private releases = 0;
  private on = false;
  /** the side whose events are listened to (enabled again after a re-protection: once) */
  private listening: Side | null = null;

  constructor(
    private readonly core: PairCore,
    /** requests a checkpoint (serialised by the supervisor's queue) */
    private readonly requestCheckpoint: () => void,
  ) {}

  get enabled(): boolean {
    return this.on;
  }

  async enable(p: Side): Promise<void> {
    await this.core.call(p, 'x-block-flush-commit', { 'node-name': DISK_NODE, enable: true });
    this.listen(p);
  }

  /** An adopted primary (adopt.ts): takes over output commit as the dead supervisor left it. */
  async adopt(p: Side): Promise<void> {
    const list = (await this.core.call(p, 'x-query-block-flush-commit')) as Array<{ 'node-name': string; releases: number }>;
    const mine = list.find((g) => g['node-name'] === DISK_NODE);
    if (!mine) return;
    this.releases = mine.releases;
    this.listen(p);
  }

  private listen(p: Side): void {
    this.on = true;
    if (this.listening === p) return;
    this.listening = p;
    p.qmp.on('event', (ev: { event: string; data?: Record<string, unknown> }) => {
      if (ev.event !== 'X_BLOCK_FLUSH_PENDING' || !this.on) return;
      // the first completion that waits since release number `releases`: if a later release
      // already answered it, no new checkpoint is needed
      if (Number(ev.data?.releases) >= this.releases) this.requestCheckpoint();
    });
  }

  /** Inside the barrier, after the secondary checkpointed: what waits now may complete. */
  async release(p: Side): Promise<void> {
    if (!this.on) return;
    const r = (await this.core.call(p, 'x-block-flush-commit-release', { 'node-name': DISK_NODE })) as { releases: number };
    this.releases = Math.max(this.releases, r.releases);
  }

  /** No secondary any more: completions no longer wait. */
  async disable(p: Side): Promise<void> {
    if (!this.on) return;
    this.on = false;
    await this.core.call(p, 'x-block-flush-commit', { 'node-name': DISK_NODE, enable: false });
  }
}
