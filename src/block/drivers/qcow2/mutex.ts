// A FIFO async mutex. qcow2 serialises every metadata update (mapping, allocation,
// refcounts) under one of these; data I/O to already-mapped clusters runs outside it.

export class Mutex {
  private locked = false;
  private waiters: Array<() => void> = [];

  async lock(): Promise<() => void> {
    if (this.locked) await new Promise<void>((r) => this.waiters.push(r));
    this.locked = true;
    return this.releaser();
  }

  /** Someone holds it (a metadata operation may be half done). */
  get isLocked(): boolean {
    return this.locked;
  }

  /** The lock at once when it is free (no waiter can be queued then), else null. */
  tryLock(): (() => void) | null {
    if (this.locked) return null;
    this.locked = true;
    return this.releaser();
  }

  private releaser(): () => void {
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const next = this.waiters.shift();
      if (next) next(); // hand the lock over without unlocking in between
      else this.locked = false;
    };
  }

  async run<T>(fn: () => Promise<T>): Promise<T> {
    const release = await this.lock();
    try {
      return await fn();
    } finally {
      release();
    }
  }
}
