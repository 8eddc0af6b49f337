// Heartbeats: each side is asked `query-version` every interval; a side that has not answered
// for longer than the timeout is declared lost (the caller decides what that means).

import type { Side } from './sides.js';
import type { PairLog } from './core.js';

/** Pings every live side once; calls `lost` for a side silent past `timeoutMs`. */
export async function heartbeat(sides: Array<Side | null>, timeoutMs: number, log: PairLog, lost: (side: Side) => void): Promise<void> {
  for (const side of sides) {
    if (!side || !side.alive) continue;
    const ping = side.qmp.execute('query-version').then(() => {
      side.lastAnswer = Date.now();
    });
    const timeout = new Promise((r) => setTimeout(r, timeoutMs));
    await Promise.race([ping.catch(() => {}), timeout]);
    if (Date.now() - side.lastAnswer > timeoutMs) {
      side.alive = false;
      log('warn', `the ${side.name} missed its heartbeat`, { ageMs: Date.now() - side.lastAnswer });
      lost(side);
    }
  }
}
