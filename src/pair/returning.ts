// A failed side whose daemon comes back across two hosts may be a fresh `lockstep pair host`
// (restarted) or the same daemon that ran on through a cut link, still holding the graph it
// had (the old primary's quorum, its export, perhaps clients). The supervisor reads such a
// daemon's generation record and change record where they are (its dirty-log node is open),
// decides as at start, and only then either fences it (split brain: it must not add to its
// history while the operator decides) or takes its graph down so that its disk can be built
// again as the survivor's secondary (the generations say it is the older side).

import { errorMessage } from '../errors.js';
import type { PairCore } from './core.js';
import type { Side } from './sides.js';
import { DISK_NODE } from './setup.js';

/** The named block nodes a daemon holds ('#blockNNN' inner nodes go with their parents). */
export async function heldNodes(core: PairCore, side: Side): Promise<string[]> {
  const nodes = (await core.call(side, 'query-named-block-nodes', { flat: true })) as Array<{ 'node-name': string }>;
  return nodes.map((n) => n['node-name']).filter((n) => !n.startsWith('#'));
}

/** Its served node, if any, acknowledges no write from here on (reads go on): the fence a lease
 *  would have been. */
export async function fenceServed(core: PairCore, side: Side): Promise<boolean> {
  if (!(await heldNodes(core, side)).includes(DISK_NODE)) return false;
  await core.call(side, 'x-block-lease-demote', { 'node-name': DISK_NODE });
  return true;
}

/**
 * Takes a daemon's whole graph down: its exports (clients disconnected), its NBD server, its
 * jobs, then its nodes from the top (a node still used by another fails to delete and is
 * tried again once its parent is gone). Each dirty log is persisted when its node closes.
 */
export async function resetDaemon(core: PairCore, side: Side): Promise<void> {
  const exports = (await core.call(side, 'query-block-exports')) as Array<{ id: string }>;
  for (const e of exports) await core.call(side, 'block-export-del', { id: e.id, mode: 'hard' });
  await core.call(side, 'nbd-server-stop').catch(() => {});
  const jobs = (await core.call(side, 'query-block-jobs')) as Array<{ device: string }>;
  for (const j of jobs) await core.call(side, 'block-job-cancel', { device: j.device, force: true }).catch(() => {});
  for (let round = 0; ; round++) {
    const left = await heldNodes(core, side);
    if (left.length === 0) return;
    let gone = 0;
    let last = '';
    for (const n of left) {
      try {
        await core.call(side, 'blockdev-del', { 'node-name': n });
        gone++;
      } catch (e) {
        last = errorMessage(e);
      }
    }
    // a cancelled job lets go of its nodes a moment later
    if (gone === 0 && round >= 20) throw new Error(`cannot take down the ${side.name} daemon's block nodes (${left.join(', ')}): ${last}`);
    if (gone === 0) await new Promise((r) => setTimeout(r, 100));
  }
}
