// A restarted supervisor resumes from the stage the dead one recorded (adopt.ts finds the
// daemons it left running and checks them): in stage protected both daemons are adopted and
// a checkpoint taken at once; degraded, the primary serves on alone; failed-over, the survivor
// serves on; primary-lost, the failover runs (or waits for the operator). A stage before the
// disk was served retires the daemons and the pair starts afresh.

import { errorMessage } from '../errors.js';
import { PairAdoptError, recordDaemons, removeDaemons, retire, type Found, type FoundDaemon, type RecordHost } from './adopt.js';
import type { Side } from './sides.js';
import { goOnAlone, loadDisk } from './disks.js';
import { PairLease } from './lease.js';
import type { PairOutputCommit } from './output-commit.js';
import { DISK_NODE, type SideLayout } from './setup.js';
import { otherSide } from './split-brain.js';

/** What adopting the daemons reads and sets on the supervisor. */
export interface ResumeHost extends RecordHost {
  readonly outputCommit: PairOutputCommit;
  lease: PairLease | null;
  serving: string[];
  layout(dir: string | undefined, attached: boolean): SideLayout;
  /** notices when a side's daemon exits or its QMP connection closes */
  watch(side: Side): Side;
  startTimers(): void;
  checkpoint(): Promise<unknown>;
  /** writes the degraded primary's changed regions */
  recordChanged(): Promise<void>;
  failover(reason: string): Promise<void>;
}

/**
 * Takes over the daemons a dead supervisor left running and resumes in the stage it
 * recorded (findDaemons found and checked them). false: none was adopted (they were still
 * starting up and are stopped now): the pair starts afresh.
 */
export async function adoptDaemons(sup: ResumeHost, found: Found): Promise<boolean> {
  const o = sup.opts;
  const r = found.record;
  const alive = [found.primary, found.secondary].filter((d): d is FoundDaemon => d !== null);
  const retireAll = async (why: string): Promise<false> => {
    for (const d of alive) {
      o.log('warn', `${why}: stopping the ${d.name} daemon of the last run (pid ${d.pid})`);
      await retire(d);
    }
    removeDaemons(o.dataDir);
    return false;
  };
  // nothing was served yet: the generations decide again what to copy (a target the copy
  // had begun is marked inconsistent and is never a source)
  // (a split brain copied nothing either, and the next start finds it again; one found while
  // the survivor served loses its clients here, as a restart of that daemon would)
  if (r.stage === 'starting' || r.stage === 'syncing' || r.stage === 'split-brain' || r.stage === 'stopped') return retireAll(`the last run ended in stage ${r.stage}, before it served the disk`);
  // the failover killed the primary: only the survivor can serve
  // by role from here: the record names the daemons by the side they were started as
  const pn = r['primary-side'] ?? 'primary';
  const sn = otherSide(pn);
  const byRole = { primary: found[pn], secondary: found[sn] };
  if (r.stage === 'failed-over' && !byRole.secondary) return retireAll('the survivor of the last failover is gone');
  const layout = sup.layout(undefined, false);
  const side = (d: FoundDaemon): Side => sup.watch({ name: d.name, qmp: d.qmp, child: null, pid: d.pid, layout, lastAnswer: Date.now(), alive: true });
  const p = (sup.primary = byRole.primary ? side(byRole.primary) : null);
  const s = (sup.secondary = byRole.secondary ? side(byRole.secondary) : null);
  if (p) sup.disks[pn] = await loadDisk(sup, p, pn, false, o.size);
  if (s) sup.disks[sn] = await loadDisk(sup, s, sn, false, o.size);
  sup.serving = r.serving;
  const pidOf = (n: 'primary' | 'secondary') => byRole[n]?.pid ?? r[n === 'primary' ? pn : sn]?.pid;
  if (r.stage === 'failed-over') {
    if (p) await retire(byRole.primary!);
    sup.primary = null;
    sup.stages.adopt('failed-over');
    o.log('info', `adopted the running survivor (pid ${pidOf('secondary')}), which serves the disk`, { serving: sup.serving });
  } else if (p && s && r.stage === 'protected') {
    sup.stages.adopt('protected');
    await resumePrimary(sup, p);
    sup.startTimers();
    let took = 'took a checkpoint';
    await sup.checkpoint().catch((e: unknown) => (took = `the first checkpoint failed: ${errorMessage(e)}`));
    o.log('info', `adopted the running primary (pid ${p.pid}) and secondary (pid ${s.pid}); ${took}`, { serving: sup.serving });
    return true;
  } else if (p && (r.stage === 'protected' || r.stage === 'degraded')) {
    if (s) await retire(byRole.secondary!);
    sup.secondary = null;
    sup.stages.adopt('degraded');
    await resumePrimary(sup, p);
    // nothing left to fail over to: flushes complete on the primary's own disk
    await sup.outputCommit.disable(p).catch(() => {});
    const pd = sup.disks[pn];
    if (r.stage === 'protected' && pd) await goOnAlone(sup, pd, 'primary');
    sup.lastError = `the secondary daemon (pid ${pidOf('secondary')}) died while no supervisor ran: the primary keeps serving without protection`;
    await sup.recordChanged().catch(() => {});
    o.log('warn', `adopted the running primary (pid ${p.pid}); the secondary is gone: degraded, the primary serves without protection`, { serving: sup.serving });
  } else if (s && !p && (r.stage === 'protected' || r.stage === 'primary-lost')) {
    sup.stages.adopt('primary-lost');
    o.log('warn', `adopted the running secondary (pid ${s.pid}); the primary (pid ${pidOf('primary')}) is gone`);
    sup.startTimers();
    if (o.failover === 'auto') {
      await sup.failover('the primary died while no supervisor ran').catch(() => {});
    } else {
      sup.lastError = 'the primary died while no supervisor ran; failover is manual: run `lockstep pair failover`';
      o.log('error', sup.lastError);
    }
    return true;
  } else {
    for (const d of alive) d.qmp.close();
    sup.primary = sup.secondary = null;
    throw new PairAdoptError(
      `cannot adopt the daemons of the last run: it recorded stage ${r.stage}, and the ${p ? `primary (pid ${p.pid})` : `secondary (pid ${s!.pid})`} is the only one running, which that stage cannot go on from. ` +
        `Nothing was changed. Stop it (kill ${alive.map((d) => d.pid).join(' ')}), then start the pair again: the disks' generations decide what is copied`,
    );
  }
  recordDaemons(sup);
  sup.startTimers();
  return true;
}

/** An adopted primary: its lease renewed again (writes stalled once it ran out), output commit as it was. */
async function resumePrimary(sup: ResumeHost, p: Side): Promise<void> {
  const o = sup.opts;
  // a supervisor killed inside a checkpoint's barrier left the guest's writes held: release
  // them (that checkpoint counts as failed; the next one is taken below)
  try {
    await sup.call(p, 'block-io-release', { 'node-name': DISK_NODE });
    o.log('warn', 'released the I/O hold the dead supervisor left on the primary (it died inside a checkpoint)');
  } catch (e) {
    if (!/is not held/.test(errorMessage(e))) throw e;
  }
  const leaseMs = o.leaseMs ?? o.heartbeatTimeoutMs;
  if (leaseMs > 0) {
    sup.lease = new PairLease(sup, leaseMs, o.heartbeatIntervalMs);
    await sup.lease.start(p);
  }
  await sup.outputCommit.adopt(p);
}
