// Gates on a node's request path: what a node may be asked to wait for around the requests
// its parents send, beyond the request tracker. Replication puts two on the primary's served
// node: output commit (a flush or FUA write completes only once a checkpoint covers it) and
// lease fencing (writes are admitted and acknowledged only while the daemon holds a lease).
//
// A gate's `complete*` runs after the request's tracked part has ended, so a barrier
// (block-io-hold) never waits for a completion that itself waits for the barrier's end.

export interface IoGate {
  /** lower runs first at completion (the last check before the acknowledgement is the lease) */
  readonly order: number;
  /** before a write, write-zeroes or discard is admitted (before it is tracked) */
  admitWrite?(): Promise<void> | void;
  /** before a write or write-zeroes is acknowledged; `fua` as the caller asked */
  completeWrite?(fua: boolean): Promise<void> | void;
  /** before a flush is acknowledged (after the flush itself succeeded) */
  completeFlush?(): Promise<void> | void;
  /** the gate is removed (nodeClosed false) or its node is closing (true): settle what waits */
  close?(nodeClosed: boolean): void;
}

/** The gates of one node, by name ("flush-commit", "lease"). */
export class IoGates {
  private readonly byName = new Map<string, IoGate>();
  private sorted: IoGate[] = [];

  get size(): number {
    return this.sorted.length;
  }
  get(name: string): IoGate | undefined {
    return this.byName.get(name);
  }
  set(name: string, gate: IoGate): void {
    this.byName.set(name, gate);
    this.sorted = [...this.byName.values()].sort((a, b) => a.order - b.order);
  }
  delete(name: string): void {
    this.byName.get(name)?.close?.(false);
    this.byName.delete(name);
    this.sorted = [...this.byName.values()].sort((a, b) => a.order - b.order);
  }
  closeAll(): void {
    for (const g of this.sorted) g.close?.(true);
  }

  async admitWrite(): Promise<void> {
    for (const g of this.sorted) if (g.admitWrite) await g.admitWrite();
  }
  async completeWrite(fua: boolean): Promise<void> {
    for (const g of this.sorted) if (g.completeWrite) await g.completeWrite(fua);
  }
  async completeFlush(): Promise<void> {
    for (const g of this.sorted) if (g.completeFlush) await g.completeFlush();
  }
}
