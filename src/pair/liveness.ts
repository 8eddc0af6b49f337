// Heartbeats that measure liveness, not load. Each side is asked `query-version` every
// interval, one ping outstanding at a time, both sides at once (a stalled primary does not
// delay the secondary's ping), on a monitor connection of its own: the daemon runs one
// connection's commands in order, so on the supervisor's connection a ping would wait behind
// a checkpoint's `block-io-hold`, which waits for the guest's requests in flight to drain (a
// write-zeroes of a whole written disk takes seconds), and a primary busy serving would be
// taken for a dead one. A ping unanswered past the heartbeat timeout makes the side
// *late*: logged, counted, its lateness kept, nothing else. A side is *lost* only when it is
// really gone: its process exited or its QMP connection closed (reported by the supervisor
// at once), or it stayed silent past the bound of the table below.
//
// Why the bounds differ: a daemon started here whose process is alive and whose socket is open
// is stalled, not gone, so it gets the long bound (a hung process still ends up lost). On
// another host a silent primary cannot be told from a cut link, and while it is silent nobody
// may be serving the disk: the timeout itself. A silent secondary costs nothing while it is
// late (checkpoints wait for it, the primary serves), so it gets the long bound too.

import type { Side } from './sides.js';
import type { PairLog } from './core.js';
import type { QmpClient } from '../qmp/client.js';

export interface LivenessBounds {
  /** a ping unanswered this long makes the side late */
  lateAfterMs: number;
  /** a ping unanswered this long makes the side lost */
  lostAfterMs: number;
}

/** The policy table: which bound applies to which side. `role`: what the side plays now (after
 *  a failover's re-protection the daemon started as secondary is the primary). */
export function livenessBounds(side: Pick<Side, 'name' | 'child' | 'pid'>, timeoutMs: number, longMs: number, role: Side['name'] = side.name): LivenessBounds {
  // a daemon adopted from a dead supervisor (adopt.ts) runs on this host too
  const local = side.child !== null || side.pid !== undefined;
  if (!local && role === 'primary') return { lateAfterMs: timeoutMs, lostAfterMs: timeoutMs };
  return { lateAfterMs: timeoutMs, lostAfterMs: Math.max(longMs, timeoutMs) };
}

export interface LateRecord {
  /** heartbeats that were late (one per episode of silence past the timeout) */
  late: number;
  /** the longest time a ping waited for its answer, in ms */
  maxLateMs: number;
}

interface Pending {
  sentAt: number;
  late: boolean;
}

export class Liveness {
  readonly records: Record<Side['name'], LateRecord> = { primary: { late: 0, maxLateMs: 0 }, secondary: { late: 0, maxLateMs: 0 } };
  private readonly pending = new Map<Side, Pending>();
  /** each side's heartbeat connection, opened at its first ping and again after it closes */
  private readonly beats = new Map<Side, Promise<QmpClient | null>>();

  constructor(
    private readonly timeoutMs: number,
    private readonly longMs: number,
    private readonly log: PairLog,
    private readonly lost: (side: Side) => void,
  ) {}

  /** One round: a ping to every live side without one outstanding, then the bounds checked.
   *  `sides`: [the primary, the secondary], by the role each plays now. */
  tick(sides: [Side | null, Side | null], now = Date.now()): void {
    // a side replaced (a failover, a secondary brought back) or gone: its connection goes
    for (const side of [...this.beats.keys()]) if (!side.alive || !sides.includes(side)) this.closeBeat(side);
    for (const [i, side] of sides.entries()) {
      if (!side || !side.alive) continue;
      const bounds = livenessBounds(side, this.timeoutMs, this.longMs, i === 0 ? 'primary' : 'secondary');
      const p = this.pending.get(side);
      if (!p) {
        this.ping(side, now);
        continue;
      }
      const silent = now - p.sentAt;
      if (silent > bounds.lostAfterMs) {
        this.pending.delete(side);
        side.alive = false;
        this.log('warn', `the ${side.name} missed its heartbeat`, { ageMs: now - side.lastAnswer, silentMs: silent });
        this.lost(side);
      } else if (silent > bounds.lateAfterMs && !p.late) {
        p.late = true;
        this.records[side.name].late++;
        this.log('warn', `the ${side.name} is late: no heartbeat answer for ${silent} ms (a transient unless it stays silent for ${bounds.lostAfterMs} ms)`);
      }
    }
  }

  /** Closes every heartbeat connection (the supervisor stops). */
  close(): void {
    for (const side of [...this.beats.keys()]) this.closeBeat(side);
  }

  private closeBeat(side: Side): void {
    const b = this.beats.get(side);
    this.beats.delete(side);
    void b?.then((c) => c?.close());
  }

  /** The side's heartbeat connection. Connecting is part of the ping's wait: a side that cannot
   *  be reached (a cut link) stays silent. One that refuses a second connection (its monitor
   *  at its connection cap) is pinged on the supervisor's own connection instead. */
  private beat(side: Side): Promise<QmpClient> {
    let b = this.beats.get(side);
    if (!b) {
      b = side.qmp.openAnother().then(
        (c) => {
          c.once('close', () => {
            if (this.beats.get(side) === b) this.beats.delete(side);
          });
          // opened after the side was dropped: nobody else closes it
          if (this.beats.get(side) !== b) c.close();
          return c;
        },
        () => {
          if (this.beats.get(side) === b) this.beats.delete(side);
          return null;
        },
      );
      this.beats.set(side, b);
    }
    return b.then((c) => (c && !c.closed ? c : side.qmp));
  }

  private ping(side: Side, now: number): void {
    const p: Pending = { sentAt: now, late: false };
    this.pending.set(side, p);
    this.beat(side).then((c) => c.execute('query-version')).then(
      () => {
        const t = Date.now();
        side.lastAnswer = t;
        const waited = t - p.sentAt;
        const rec = this.records[side.name];
        if (waited > this.timeoutMs) {
          if (!p.late) rec.late++;
          this.log('warn', `the ${side.name} answered its heartbeat late`, { waitedMs: waited });
        }
        rec.maxLateMs = Math.max(rec.maxLateMs, waited > this.timeoutMs ? waited : 0);
        if (this.pending.get(side) === p) this.pending.delete(side);
      },
      () => {
        // a failed ping: the connection's close (or the exit) reports the loss
        if (this.pending.get(side) === p) this.pending.delete(side);
      },
    );
  }
}
