// Copying a disk from one side to the other before replication starts, in the direction the
// generations decided: a mirror, run on the primary's daemon, from the primary's disk onto the
// secondary's forward export, or from that export onto the primary's disk.

import type { QmpClient } from '../qmp/client.js';
import type { PairLog } from './core.js';
import { DISK_NODE } from './setup.js';

export type SyncProgress = (done: number, total: number, etaSeconds: number | null, what?: 'initial sync' | 'resync' | 'failover commit') => void;

/** Mirrors node `device` onto node `target` of the daemon `p` until it is ready, then ends it. */
export async function initialSync(
  p: QmpClient,
  log: PairLog,
  onProgress: SyncProgress | undefined,
  device = DISK_NODE,
  target = 'sync-target',
): Promise<void> {
  const started = Date.now();
  await p.execute('blockdev-mirror', { 'job-id': 'lockstep-sync', device, target, sync: 'full' });
  for (;;) {
    const jobs = (await p.execute('query-block-jobs')) as Array<{ device: string; offset: number; len: number; ready: boolean }>;
    const j = jobs.find((x) => x.device === 'lockstep-sync');
    if (!j) throw new Error('the initial sync ended before it was ready');
    const elapsed = (Date.now() - started) / 1000;
    const eta = j.offset > 0 ? (elapsed * (j.len - j.offset)) / j.offset : null;
    onProgress?.(j.offset, j.len, eta, 'initial sync');
    if (j.ready) break;
    await new Promise((r) => setTimeout(r, 200));
  }
  const done = p.waitEvent('BLOCK_JOB_COMPLETED', (d) => d.device === 'lockstep-sync', 60_000);
  await p.execute('block-job-cancel', { device: 'lockstep-sync' });
  await done;
  log('info', 'initial sync done', { seconds: (Date.now() - started) / 1000 });
}
