// Failover: fence the old primary (kill it, or stop its export when it still answers on
// another host), fence the forwarded writes, commit the secondary's overlays into its disk
// (back to the last checkpoint) and serve the recovered disk.

import { errorMessage } from '../errors.js';
import type { PairCore } from './core.js';
import type { Side } from './sides.js';
import { DISK_NODE } from './setup.js';

export interface FailoverHooks {
  /** exports the recovered node on the user's addresses */
  serve(side: Side, node: string): Promise<void>;
  /** before the commit rewrites the survivor's disk: mark it inconsistent */
  beforeCommit(): Promise<void>;
  /** the commit is done: the survivor's disk starts a new generation (before it is served) */
  afterCommit(): Promise<void>;
  /** the commit's progress (bytes), for a terminal line */
  commitProgress?(done: number, total: number): void;
}

/** Runs the failover steps. */
export async function runFailover(core: PairCore, reason: string, hooks: FailoverHooks): Promise<void> {
  const s = core.secondary;
  if (!s || !s.alive) throw new Error('the secondary is not running');
  core.log('warn', `failing over: ${reason}`);
  const p = core.primary;
  if (p?.alive && p.child) p.child.kill('SIGKILL');
  else if (p?.alive && p.pid !== undefined) process.kill(p.pid, 'SIGKILL'); // adopted here
  else if (p?.alive) {
    // a primary on another host that still answers (manual failover): stop its export so
    // that the guest cannot go on writing to a disk that is no longer the one served
    await core.call(p, 'nbd-server-stop', undefined, 1000).catch((e: unknown) =>
      core.log('warn', `could not fence the primary's export: ${errorMessage(e)}`),
    );
  }
  // Fence first: close the export of forwarded writes so that a primary that is only
  // partly dead (a cut link that comes back) can never write to the recovered disk.
  await core.call(s, 'nbd-server-stop');
  // commits active+hidden into the secondary disk
  await hooks.beforeCommit();
  await core.call(s, 'xen-set-replication', { enable: false, primary: false, failover: true });
  for (;;) {
    const list = (await core.call(s, 'query-replication')) as Array<{ stage: string; 'commit-progress'?: { current: number; total: number } }>;
    const cp = list.find((x) => x['commit-progress'])?.['commit-progress'];
    if (cp) hooks.commitProgress?.(cp.current, cp.total);
    if (list.every((x) => x.stage === 'done')) break;
    if (list.some((x) => x.stage === 'failover-failed')) throw new Error('the failover commit failed');
    await new Promise((r) => setTimeout(r, 10));
  }
  await hooks.afterCommit();
  // As in COLO, the recovered disk is served under a one-child quorum: a replication child
  // can join it later (x-blockdev-change inside a barrier) while clients stay connected, so
  // that the survivor becomes a primary without re-exporting anything. Named as the
  // primary's served node, so the barrier, output commit and lease address it alike.
  await core.call(s, 'blockdev-add', { driver: 'quorum', 'node-name': DISK_NODE, 'read-pattern': 'fifo', 'vote-threshold': 1, children: [SURVIVOR_CHILD] });
  await hooks.serve(s, DISK_NODE);
}

/** The node under the survivor's quorum: the secondary's replication node, its overlays
 *  committed into the disk below it. */
export const SURVIVOR_CHILD = 'childs0';
