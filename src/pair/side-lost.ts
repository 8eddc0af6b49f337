// A side lost (its process exited, its QMP connection closed, or it stayed silent past its
// bound: liveness.ts). The primary: a failover when it is automatic and the secondary runs,
// otherwise stage primary-lost (never onto a resync's target). The secondary: stage degraded,
// the primary's disk going on alone with its generation recorded first, then the secondary
// brought back (bring-back.ts).

import { errorMessage } from '../errors.js';
import type { PairCore } from './core.js';
import { DISK_FILE, goOnAlone, outdatePeer, type PairDisk } from './disks.js';
import type { PairSideName } from './generations.js';
import type { PairLease } from './lease.js';
import type { PairOptions } from './options.js';
import type { PairOutputCommit } from './output-commit.js';
import type { Side } from './sides.js';

/** What a lost side reads and sets on the supervisor. */
export interface LostHost extends PairCore {
  readonly opts: PairOptions;
  readonly disks: Record<PairSideName, PairDisk | null>;
  readonly outputCommit: PairOutputCommit;
  readonly lease: PairLease | null;
  readonly failingOver: Promise<void> | null;
  serving: string[];
  /** the barrier running, if any */
  readonly checkpointRunning: Promise<unknown> | null;
  inconsistentReason(): string;
  failover(reason: string): Promise<void>;
  recordChanged(): Promise<void>;
  scheduleReturn(): void;
}

/** `why`: for a secondary still running that can no longer be replicated to (its forward
 *  failed), what the log and last-error say instead of its death. */
export async function sideLost(sup: LostHost, side: Side, why?: string): Promise<void> {
  if (sup.stages.stage === 'stopped') return;
  if (side !== sup.primary && side !== sup.secondary) return; // a side already replaced
  // by role: after a re-protection that swapped roles the daemon started as secondary is the primary
  if (side === sup.primary) {
    sup.lease?.stop();
    if (sup.stages.stage === 'failed-over' || sup.failingOver) return;
    if (sup.stages.stage === 'split-brain') {
      // the survivor that served through the split brain: nothing can take over (neither
      // disk is current); the split brain still waits for `resolve`
      sup.serving = [];
      sup.opts.log('error', `the ${side.name} daemon, which served during the split brain, died: nothing serves the disk`);
      return;
    }
    if (sup.stages.stage === 'resyncing') {
      // never fail over to a resync target: its disk is a mix of old and new regions
      sup.stages.to('primary-lost');
      sup.lastError = `the primary died during a resync; no failover: ${sup.inconsistentReason()}`;
      sup.opts.log('error', sup.lastError);
      sup.emit('primary-lost');
      return;
    }
    if (sup.opts.failover === 'auto' && sup.secondary?.alive) {
      await sup.failover('the primary died').catch(() => {});
      return;
    }
    if (sup.stages.stage === 'protected') sup.stages.to('primary-lost');
    sup.lastError = sup.secondary?.alive
      ? 'the primary died; failover is manual: run `lockstep pair failover`'
      : 'the primary died and the secondary is not running: nothing can serve the disk';
    sup.opts.log('error', sup.lastError);
    sup.emit('primary-lost');
  } else if (sup.stages.stage === 'protected') {
    sup.stages.to('degraded');
    sup.lastError = `${why ?? 'the secondary died'}: the primary keeps serving without protection`;
    sup.opts.log('error', sup.lastError);
    await sup.checkpointRunning?.catch(() => {});
    // from here the primary's disk counts its changes against the secondary's generation,
    // and the secondary, which may only be cut off and still look current, is noted as not
    // outdated yet: persisted before any flush completes on the primary alone (the disks by
    // the daemons' side names: after a re-protection the roles are swapped)
    const pd = sup.primary ? sup.disks[sup.primary.name] : null;
    const sd = sup.disks[side.name];
    const peerGen = sd?.kept ? sd.meta?.current : undefined;
    if (pd) await goOnAlone(sup, pd, 'primary', undefined, peerGen).catch((e: unknown) => sup.opts.log('error', `cannot record the primary's new generation: ${errorMessage(e)}`));
    // nothing left to fail over to: flushes complete on the primary's own disk
    if (sup.primary) await sup.outputCommit.disable(sup.primary).catch((e: unknown) => sup.opts.log('error', `cannot turn flush commit off: ${errorMessage(e)}`));
    // then the peer is marked outdated if it answers (flushes do not wait on that)
    if (pd && sd) await outdatePeer(sup, pd, side, DISK_FILE[side.name], sup.opts.heartbeatTimeoutMs).catch(() => {});
    await sup.recordChanged().catch((e: unknown) => sup.opts.log('warn', `cannot read the changed regions: ${errorMessage(e)}`));
    sup.emit('degraded');
    sup.scheduleReturn();
  } else if (sup.stages.stage === 'resyncing') {
    // the live resync fails on its own (its peer is gone) and goes back to degraded
    sup.opts.log('error', 'the secondary died during the resync');
  }
}
