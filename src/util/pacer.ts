// Bounded event-loop turns for work that walks a large range: a discard of the whole disk,
// copy-before-write of thousands of clusters, a zeroed range of a qcow2 image. Such work is
// mostly metadata and memory, so its awaits resolve as microtasks and, left alone, the
// whole request runs in one turn of the event loop: the daemon answers nothing (QMP,
// heartbeats, other NBD requests) until it is done.
//
// Code that processes a request in pieces calls `pace()` between pieces. While the current
// turn has run for less than the budget it returns undefined at once (nothing to await);
// past the budget it returns a promise that resolves after the event loop had a turn (I/O
// polled, timers run). One Pacer serves a whole graph: concurrent requests share the turn's
// budget, so many large requests at once still leave the loop within about one budget plus
// one piece.

export const DEFAULT_TURN_BUDGET_MS = 4;

export class Pacer {
  /** when the current turn began, as far as this pacer knows (the last resume) */
  private turnStart = performance.now();
  private waiters: Array<() => void> = [];
  private scheduled = false;
  /** times work gave the event loop a turn (for tests and diagnostics) */
  yields = 0;

  constructor(readonly budgetMs = DEFAULT_TURN_BUDGET_MS) {}

  /** undefined when the caller may go on; otherwise a promise to await first. */
  pace(): Promise<void> | undefined {
    if (performance.now() - this.turnStart < this.budgetMs) return undefined;
    return this.yieldTurn();
  }

  /** Resolves after the event loop had a turn, whatever the budget says. */
  yieldTurn(): Promise<void> {
    this.yields++;
    const p = new Promise<void>((r) => this.waiters.push(r));
    if (!this.scheduled) {
      this.scheduled = true;
      // setImmediate runs after the poll phase: sockets and timers get their turn first
      setImmediate(() => this.resume());
    }
    return p;
  }

  private resume(): void {
    this.scheduled = false;
    this.turnStart = performance.now();
    const w = this.waiters;
    this.waiters = [];
    // They run, one after the other, as microtasks once this callback returns; whichever
    // finds the budget spent queues itself for the next turn.
    for (const f of w) f();
  }
}
