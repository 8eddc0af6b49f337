// Output commit for the primary's served node (issue 16). A flush or FUA write on the node
// completes only once the caller says a checkpoint covers it: the caller (the pair
// supervisor, or whoever drives replication over QMP) sends x-block-flush-commit-release
// inside a checkpoint's barrier, after the secondary has checkpointed, and every completion
// waiting at that moment goes on. That is sound because each waiter registers after the
// writes it vouches for were acknowledged: those writes finished either before the barrier's
// hold (so the checkpoint has them) or while the hold drained (likewise), and no write
// finishes between the drain and the release.
//
// Group commit: when the first completion starts waiting, X_BLOCK_FLUSH_PENDING tells the
// caller, who can start a checkpoint at once; everything that arrives until that checkpoint's
// release shares it. The event carries the number of releases so far, so that a caller can
// tell a request its last checkpoint already answered from one that needs a new checkpoint.
//
// Writes without FUA and reads never wait here.

import type { IoGate } from '../block/gate.js';
import type { BlockNode } from '../block/node.js';
import { BlockError } from '../errors.js';

export const FLUSH_COMMIT_GATE = 'flush-commit';
export const FLUSH_PENDING_EVENT = 'X_BLOCK_FLUSH_PENDING';

interface Waiter {
  resolve(): void;
  reject(e: Error): void;
  since: number;
}

export interface FlushCommitStatus {
  'node-name': string;
  /** completions waiting for a checkpoint */
  pending: number;
  /** x-block-flush-commit-release commands so far */
  releases: number;
  /** completions released so far */
  released: number;
  /** how long the oldest waiting completion has waited, ms (absent when none waits) */
  'oldest-wait-ms'?: number;
}

export class FlushCommit implements IoGate {
  readonly order = 10;
  private waiting: Waiter[] = [];
  private releases = 0;
  private released = 0;
  private failed: Error | null = null;

  constructor(
    readonly node: BlockNode,
    private readonly emitEvent: (name: string, data: Record<string, unknown>) => void,
  ) {}

  completeWrite(fua: boolean): Promise<void> | void {
    if (fua) return this.wait();
  }

  completeFlush(): Promise<void> {
    return this.wait();
  }

  private wait(): Promise<void> {
    if (this.failed) return Promise.reject(this.failed);
    return new Promise<void>((resolve, reject) => {
      this.waiting.push({ resolve, reject, since: performance.now() });
      if (this.waiting.length === 1) {
        this.emitEvent(FLUSH_PENDING_EVENT, { 'node-name': this.node.name, releases: this.releases });
      }
    });
  }

  /** A checkpoint covers everything waiting now: let it complete. */
  release(): { released: number; releases: number } {
    const w = this.waiting;
    this.waiting = [];
    this.releases++;
    this.released += w.length;
    for (const x of w) x.resolve();
    return { released: w.length, releases: this.releases };
  }

  /** Completions waiting now, and any later ones, fail: they are never acknowledged. */
  fail(e: Error): number {
    this.failed = e;
    const w = this.waiting;
    this.waiting = [];
    for (const x of w) x.reject(e);
    return w.length;
  }

  /** Switched off, what waits completes (the caller's choice, e.g. no secondary is left);
   *  with the node closing, it fails. */
  close(nodeClosed: boolean): void {
    if (nodeClosed && !this.failed) this.fail(new BlockError('ENOMEDIUM', `node '${this.node.name}' is closed`));
    else if (this.failed) this.fail(this.failed);
    else this.release();
  }

  status(): FlushCommitStatus {
    const st: FlushCommitStatus = { 'node-name': this.node.name, pending: this.waiting.length, releases: this.releases, released: this.released };
    if (this.waiting.length > 0) st['oldest-wait-ms'] = Math.round(performance.now() - this.waiting[0]!.since);
    return st;
  }
}

export function fencedError(node: BlockNode): BlockError {
  return new BlockError('EIO', `node '${node.name}' was demoted: the completion is never acknowledged`);
}
