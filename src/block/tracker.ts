// In-flight request tracking for one node: overlapping requests can be serialised (the
// read-modify-write of an unaligned write, a copy-before-write copy), all requests can be
// drained, and new ones can be held while a checkpoint or a graph switch runs (quiesce).

export interface TrackedRequest {
  readonly offset: number;
  readonly end: number;
  readonly serialising: boolean;
  /** settles when the request ends */
  readonly done: Promise<void>;
}

interface Entry extends TrackedRequest {
  resolve(): void;
}

export class RequestTracker {
  private readonly active = new Set<Entry>();
  private holds = 0;
  private holdWaiters: Array<() => void> = [];
  private idleWaiters: Array<() => void> = [];

  get inFlight(): number {
    return this.active.size;
  }

  get held(): boolean {
    return this.holds > 0;
  }

  private conflicts(offset: number, end: number, serialising: boolean): Promise<void>[] {
    const out: Promise<void>[] = [];
    for (const a of this.active) {
      if (a.offset < end && offset < a.end && (a.serialising || serialising)) out.push(a.done);
    }
    return out;
  }

  /**
   * Starts tracking [offset, offset+length). A serialising request waits for every
   * overlapping request; any request waits for overlapping serialising ones. Requests
   * wait while the tracker is held, unless `bypassHold` (work that the holder itself does).
   */
  async begin(offset: number, length: number, serialising = false, bypassHold = false): Promise<TrackedRequest> {
    const end = offset + Math.max(length, 1);
    for (;;) {
      if (this.holds > 0 && !bypassHold) {
        await new Promise<void>((r) => this.holdWaiters.push(r));
        continue;
      }
      const c = this.conflicts(offset, end, serialising);
      if (c.length === 0) break;
      await Promise.all(c);
    }
    let resolve!: () => void;
    const done = new Promise<void>((r) => (resolve = r));
    const e: Entry = { offset, end, serialising, done, resolve };
    this.active.add(e);
    return e;
  }

  end(req: TrackedRequest): void {
    const e = req as Entry;
    if (!this.active.delete(e)) return;
    e.resolve();
    if (this.active.size === 0) {
      const w = this.idleWaiters;
      this.idleWaiters = [];
      for (const f of w) f();
    }
  }

  /** Waits until nothing is in flight (new requests may still start unless held). */
  async drain(): Promise<void> {
    while (this.active.size > 0) await new Promise<void>((r) => this.idleWaiters.push(r));
  }

  /**
   * Holds new requests and waits for the in-flight ones. Returns the release function;
   * holds nest.
   */
  async hold(): Promise<() => void> {
    this.holds++;
    let released = false;
    const release = (): void => {
      if (released) return;
      released = true;
      this.holds--;
      if (this.holds === 0) {
        const w = this.holdWaiters;
        this.holdWaiters = [];
        for (const f of w) f();
      }
    };
    try {
      await this.drain();
    } catch (e) {
      release();
      throw e;
    }
    return release;
  }
}
