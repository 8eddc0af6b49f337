// In-flight request tracking for one node: overlapping requests can be serialised (the
// read-modify-write of an unaligned write, a copy-before-write copy), overlapping writes can
// be ordered (a node whose children must apply them alike), all requests can be drained, and
// new ones can be held while a checkpoint or a graph switch runs (quiesce, with the one
// primitive in util/quiesce.ts).

import { Quiesce } from '../util/quiesce.js';

/**
 * How a tracked request relates to overlapping ones in flight:
 * - 'shared': waits only for serialising ones (reads, and writes of most nodes);
 * - 'ordered': a write, write-zeroes or discard that also waits for overlapping ordered
 *   ones, so no two overlapping ordered requests are ever in flight at once (reads still pass);
 * - 'serialising': waits for every overlapping request, and every overlapping one waits for it.
 */
export type RequestMode = 'shared' | 'ordered' | 'serialising';

export interface TrackedRequest {
  readonly offset: number;
  readonly end: number;
  readonly mode: RequestMode;
  /** settles when the request ends */
  readonly done: Promise<void>;
}

/** A tracked request; its `done` promise is made only when something waits for it. */
class Entry implements TrackedRequest {
  private promise: Promise<void> | null = null;
  private resolver: (() => void) | null = null;
  private ended = false;
  constructor(
    readonly offset: number,
    readonly end: number,
    readonly mode: RequestMode,
  ) {}
  get done(): Promise<void> {
    if (this.ended) return Promise.resolve();
    this.promise ??= new Promise<void>((r) => (this.resolver = r));
    return this.promise;
  }
  resolve(): void {
    this.ended = true;
    this.resolver?.();
  }
}

export class RequestTracker {
  private readonly active = new Set<Entry>();
  /** counts the entries of `active`; its hold is the node's hold */
  private readonly quiesce = new Quiesce();

  get inFlight(): number {
    return this.active.size;
  }

  get held(): boolean {
    return this.quiesce.held;
  }

  private conflicts(offset: number, end: number, mode: RequestMode): Promise<void>[] {
    const out: Promise<void>[] = [];
    for (const a of this.active) {
      if (a.offset < end && offset < a.end && conflict(a.mode, mode)) out.push(a.done);
    }
    return out;
  }

  /**
   * Starts tracking [offset, offset+length), once no overlapping request that conflicts
   * with `mode` is in flight (see RequestMode). Requests wait while the tracker is held,
   * unless `bypassHold` (work that the holder itself does). A request still waiting is not
   * in flight: drain() and hold() do not wait for it, and it re-checks the hold when its
   * turn comes, so it is held behind a barrier instead of slipping through it.
   */
  async begin(offset: number, length: number, mode: RequestMode = 'shared', bypassHold = false): Promise<TrackedRequest> {
    const end = offset + Math.max(length, 1);
    for (;;) {
      if (this.quiesce.held && !bypassHold) {
        await this.quiesce.released();
        continue;
      }
      const c = this.conflicts(offset, end, mode);
      if (c.length === 0) break;
      await Promise.all(c);
    }
    const e = new Entry(offset, end, mode);
    this.active.add(e);
    this.quiesce.start();
    return e;
  }

  /**
   * begin() when the request can start at once (no hold, no conflicting request in flight),
   * without a promise; null when it would have to wait (then call begin()).
   */
  tryBegin(offset: number, length: number, mode: RequestMode = 'shared'): TrackedRequest | null {
    if (this.quiesce.held) return null;
    const end = offset + Math.max(length, 1);
    for (const a of this.active) if (a.offset < end && offset < a.end && conflict(a.mode, mode)) return null;
    const e = new Entry(offset, end, mode);
    this.active.add(e);
    this.quiesce.start();
    return e;
  }

  end(req: TrackedRequest): void {
    const e = req as Entry;
    if (!this.active.delete(e)) return;
    e.resolve();
    this.quiesce.leave();
  }

  /** Waits until nothing is in flight (new requests may still start unless held). */
  drain(): Promise<void> {
    return this.quiesce.drain();
  }

  /**
   * Holds new requests and waits for the in-flight ones. Returns the release function;
   * holds nest.
   */
  hold(): Promise<() => void> {
    return this.quiesce.hold();
  }

  /** Holds, runs `fn` with nothing in flight, releases. */
  holding<T>(fn: () => T | Promise<T>): Promise<T> {
    return this.quiesce.holding(fn);
  }
}

function conflict(a: RequestMode, b: RequestMode): boolean {
  if (a === 'serialising' || b === 'serialising') return true;
  return a === 'ordered' && b === 'ordered';
}
