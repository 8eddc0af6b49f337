// Failover: fence the old primary (kill it, or stop its export when it still answers on
// another host), fence the forwarded writes, commit the secondary's overlays into its disk
// (back to the last checkpoint) and serve the recovered disk. `startFailover` is the
// supervisor's side of it: what refuses a failover, the lease waited out, the generation
// records around the commit, and the stage.

import { errorMessage } from '../errors.js';
import type { PairCore } from './core.js';
import type { Side } from './sides.js';
import { DISK_NODE } from './setup.js';
import { goOnAlone, saveDisk, type PairDisk } from './disks.js';
import type { PairSideName } from './generations.js';
import type { PairLease } from './lease.js';
import type { PairOptions } from './options.js';
import type { ResyncProgress } from './reprotect.js';

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

/** What a failover reads and sets on the supervisor. */
export interface FailoverHost extends PairCore {
  readonly opts: PairOptions;
  readonly disks: Record<PairSideName, PairDisk | null>;
  /** the failover running or done (a second one shares it) */
  failingOver: Promise<void> | null;
  readonly resyncProgress: ResyncProgress | null;
  readonly lease: PairLease | null;
  readonly serving: string[];
  /** why the secondary's disk may not serve (a resync into it runs) */
  inconsistentReason(): string;
  serve(side: Side, node: string): Promise<void>;
  /** across two hosts: re-protect once the failed side answers again (peer-return.ts) */
  watchPeerReturn(): void;
}

/** Fails over to the secondary and serves the recovered disk (one failover at a time). */
export function startFailover(sup: FailoverHost, reason: string): Promise<void> {
  if (sup.failingOver) return sup.failingOver;
  // refused without touching last-error, which says what settles the split brain
  if (sup.stages.stage === 'split-brain') return Promise.reject(new Error('no failover in stage split-brain: neither disk is current; run `lockstep pair resolve --keep primary|secondary`'));
  const run = (async () => {
    if (!sup.secondary?.alive) throw new Error('the secondary is not running');
    if (sup.resyncProgress) throw new Error(`no failover: ${sup.inconsistentReason()}`);
    if (!sup.stages.policy.failover) throw new Error(`no failover in stage ${sup.stages.stage}`);
    const sd = sup.disks[sup.secondary.name];
    const m = sd?.meta;
    if (m && !m.consistent) {
      throw new Error(
        `the secondary disk is inconsistent (generation ${m.current}: a resync into it or a failover commit did not finish): failing over to it is refused; ` +
          'bring the primary back (its disk is the consistent one), or declare a disk current with --force-current',
      );
    }
    const t0 = Date.now();
    // nothing stops an old primary on another host that no longer answers, without a lease:
    // it may go on acknowledging writes, and the survivor's record says so (split-brain.ts)
    const old = sup.primary;
    const unfenced = !sup.lease && old !== null && !old.alive && !old.child && old.pid === undefined;
    const peerGeneration = old ? sup.disks[old.name]?.meta?.current : undefined;
    await runFailover(sup, reason, {
      commitProgress: (done, total) => sup.opts.onProgress?.(done, total, null, 'failover commit'),
      serve: async (side, node) => {
        // never two writers: the old primary acknowledges nothing once its lease is out
        if (sup.lease) {
          const waited = await sup.lease.waitExpired();
          sup.opts.log('info', "the old primary's lease has run out", { waitedMs: Math.round(waited) });
        }
        await sup.serve(side, node);
      },
      beforeCommit: async () => {
        // a primary that still answers (manual failover) is demoted: what it holds fails
        const p = sup.primary;
        if (p?.alive) await sup.call(p, 'x-block-lease-demote', { 'node-name': DISK_NODE }, 1000).catch(() => {});
        if (sd?.meta) await saveDisk(sup, sd, { ...sd.meta, consistent: false, updated: new Date().toISOString() });
      },
      afterCommit: async () => {
        if (sd) await goOnAlone(sup, sd, 'primary', unfenced ? peerGeneration : undefined);
        if (unfenced) sup.opts.log('warn', 'failed over without fencing the old primary (no lease, its host unreachable): if it went on writing, the next start finds a split brain');
      },
    });
    if (!sup.stages.tryTo('failed-over')) return;
    sup.opts.log('warn', 'failed over: the recovered disk is served by the secondary', { serving: sup.serving, ms: Date.now() - t0 });
    sup.emit('failed-over', { ms: Date.now() - t0, serving: sup.serving });
    sup.watchPeerReturn();
  })();
  sup.failingOver = run;
  run.catch((e: unknown) => {
    sup.lastError = `failover failed: ${errorMessage(e)}`;
    sup.opts.log('error', sup.lastError);
    sup.failingOver = null;
  });
  return run;
}
