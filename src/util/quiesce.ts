// The one quiesce primitive: activities in flight are counted, new ones can be held while a
// holder works (a checkpoint, a handle swap), and anyone can wait until none is in flight.
// The request tracker (block-io-hold, copy-before-write's checkpoint, make_empty, reopen),
// NBD transmission (a connection's requests before it closes) and qcow2 (data I/O that
// cluster frees wait for) all count with it, so there is one meaning of "drained".
//
// An activity that waits for a hold to end is not in flight: drain() and hold() do not wait
// for it, and it checks the hold again when it is woken (a new hold may have begun).

export class Quiesce {
  private active = 0;
  private holds = 0;
  private holdWaiters: Array<() => void> = [];
  private idleWaiters: Array<() => void> = [];

  get inFlight(): number {
    return this.active;
  }

  get held(): boolean {
    return this.holds > 0;
  }

  /** Resolves when the holds in force now are released (check `held` again after). */
  released(): Promise<void> {
    if (this.holds === 0) return Promise.resolve();
    return new Promise<void>((r) => this.holdWaiters.push(r));
  }

  /** Counts one activity in flight now, whether held or not (the caller checked `held`). */
  start(): void {
    this.active++;
  }

  /** Waits out any hold, then counts one activity in flight. */
  async enter(): Promise<void> {
    while (this.holds > 0) await this.released();
    this.active++;
  }

  /** Ends one activity; the last one wakes whoever waits for idle. */
  leave(): void {
    if (this.active === 0) throw new Error('Quiesce.leave() without an activity in flight');
    if (--this.active === 0) {
      const w = this.idleWaiters;
      this.idleWaiters = [];
      for (const f of w) f();
    }
  }

  /** Waits until nothing is in flight (new activities may still start unless held). */
  async drain(): Promise<void> {
    while (this.active > 0) await new Promise<void>((r) => this.idleWaiters.push(r));
  }

  /** Holds new activities and waits for the ones in flight; returns the release (holds nest). */
  async hold(): Promise<() => void> {
    this.holds++;
    let released = false;
    const release = (): void => {
      if (released) return;
      released = true;
      if (--this.holds === 0) {
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

  /** Holds, runs `fn` with nothing in flight, releases (also when `fn` throws). */
  async holding<T>(fn: () => T | Promise<T>): Promise<T> {
    const release = await this.hold();
    try {
      return await fn();
    } finally {
      release();
    }
  }
}
