// `lockstep pair takeover`: the failover run on the secondary's own node, for when the pair's
// supervisor is gone with the old primary's node (under Pacemaker the supervisor runs on the
// promoted node, and the resource agent ocf/lockstep promotes the secondary with this). The
// daemon here must be the pair's live secondary (the replication graph a supervisor built) and
// its disk's generation record must say consistent. Then the supervisor's failover steps: fence
// the forwarded writes, wait until the old primary's lease has certainly run out, commit the
// overlays into the disk (back to the last checkpoint), start a new generation, serve the disk.

import { rmSync } from 'node:fs';
import { posix } from 'node:path';
import { QmpClient, type QmpClientOptions } from '../qmp/client.js';
import { errorMessage } from '../errors.js';
import { newId, notCurrentReason, parseMeta, startGeneration, type DiskMeta } from './generations.js';
import { DISK_FILE } from './disks.js';
import { LEASE_FIXED_MARGIN_MS, LEASE_RATE_MARGIN } from './lease.js';
import type { SocketAddress } from '../util/socket-address.js';

/** The secondary's node the failover serves (the replication filter over active -> hidden -> disk). */
export const TAKEOVER_NODE = 'childs0';
export const SERVE_EXPORT = 'disk';

export class TakeoverError extends Error {
  constructor(
    readonly code: 'ENOTSECONDARY' | 'ENOMETA' | 'EINCONSISTENT' | 'EOUTDATED' | 'EFAILED',
    message: string,
  ) {
    super(message);
  }
}

export interface TakeoverOptions {
  qmp: SocketAddress;
  qmpOptions?: QmpClientOptions;
  /** the secondary's data directory on this node (secondary.qcow2 and its record) */
  dir: string;
  /** the old primary's lease, ms (0: it had none) */
  leaseMs: number;
  /** where to serve the recovered disk */
  nbdSocket: string;
  nbdTcp?: { host: string; port: number };
  log?: (msg: string) => void;
}

export interface TakeoverResult {
  /** the disk was already served by an earlier takeover: nothing was done */
  'already-done': boolean;
  generation: string;
  /** when the secondary took its last checkpoint (its clock, ISO), null if it never did */
  'last-checkpoint': string | null;
  'lease-waited-ms': number;
  serving: string[];
}

interface ReplicationEntry {
  mode: string;
  stage: string;
  'last-checkpoint'?: number;
}

const iso = (ms: number | undefined): string | null => (ms === undefined ? null : new Date(ms).toISOString());

/** The disk's record, read by the daemon that holds the disk (x-meta-read), as the supervisor does. */
async function readRecord(q: QmpClient, path: string): Promise<DiskMeta> {
  let m: DiskMeta | null;
  try {
    m = parseMeta(await q.execute('x-meta-read', { filename: path }), path);
  } catch (e) {
    throw new TakeoverError('ENOMETA', `refusing to take over: ${errorMessage(e)}`);
  }
  if (!m) throw new TakeoverError('ENOMETA', `refusing to take over: there is no generation record ${path}: lockstep never guesses that a disk is up to date`);
  return m;
}

/** Written crash-safely by the daemon (x-meta-write): the old record or the new one survives. */
async function writeRecord(q: QmpClient, path: string, m: DiskMeta): Promise<void> {
  await q.execute('x-meta-write', { filename: path, data: m });
}

export async function takeover(o: TakeoverOptions): Promise<TakeoverResult> {
  const t0 = performance.now();
  const log = o.log ?? (() => {});
  const q = await QmpClient.open(o.qmp, o.qmpOptions ?? {});
  try {
    const serving = [`nbd+unix:///${SERVE_EXPORT}?socket=${o.nbdSocket}`, ...(o.nbdTcp ? [`nbd://${o.nbdTcp.host}:${o.nbdTcp.port}/${SERVE_EXPORT}`] : [])];
    const recordPath = posix.join(o.dir, `${DISK_FILE.secondary}.meta.json`);
    const repl = (await q.execute('query-replication')) as ReplicationEntry[];
    const sec = repl.find((r) => r.mode === 'secondary');
    const exports = (await q.execute('query-block-exports')) as Array<{ id: string }>;
    if (sec?.stage === 'done' && exports.some((e) => e.id === SERVE_EXPORT)) {
      const m = await readRecord(q, recordPath);
      return { 'already-done': true, generation: m.current, 'last-checkpoint': iso(sec['last-checkpoint']), 'lease-waited-ms': 0, serving };
    }
    if (!sec || sec.stage !== 'running') {
      throw new TakeoverError(
        'ENOTSECONDARY',
        `refusing to take over: this daemon is not the secondary of a running pair (${sec ? `its replication is in stage ${sec.stage}` : 'no replication in mode secondary'}); ` +
          'only a secondary that was connected until its primary was lost is known to hold the last checkpoint',
      );
    }
    const meta = await readRecord(q, recordPath);
    // Current from the persisted flags (written at each confirmed checkpoint, or by the primary
    // that went on alone), not from the live graph: a secondary cut off while its primary went
    // on alone still runs its replication graph
    const why = notCurrentReason(meta);
    if (why) throw new TakeoverError(meta.consistent ? 'EOUTDATED' : 'EINCONSISTENT', `refusing to take over: the generation record ${recordPath} ${why}`);
    // Fence first: no write of a partly alive old primary reaches this disk from here on.
    await q.execute('nbd-server-stop');
    // The old primary acknowledges nothing once its lease is out. Its supervisor ran on its
    // node, which the cluster saw lost before promoting here: the last renewal came before
    // t0, so the lease is out by t0 + duration, scaled for clock rates.
    let waited = 0;
    if (o.leaseMs > 0) {
      const until = t0 + o.leaseMs * (1 + LEASE_RATE_MARGIN) + LEASE_FIXED_MARGIN_MS;
      waited = Math.max(0, until - performance.now());
      if (waited > 0) await new Promise((r) => setTimeout(r, Math.ceil(waited)));
      log(`the old primary's lease has run out (waited ${Math.round(waited)} ms)`);
    }
    // inconsistent while the commit rewrites the disk: a crash here never promotes it
    await writeRecord(q, recordPath, { ...meta, consistent: false, updated: new Date().toISOString() });
    await q.execute('xen-set-replication', { enable: false, primary: false, failover: true });
    for (;;) {
      const list = (await q.execute('query-replication')) as ReplicationEntry[];
      if (list.some((x) => x.stage === 'failover-failed')) throw new TakeoverError('EFAILED', 'the failover commit failed: the disk stays marked inconsistent');
      if (list.every((x) => x.stage === 'done')) break;
      await new Promise((r) => setTimeout(r, 10));
    }
    const next = startGeneration(meta, newId(), 'primary');
    await writeRecord(q, recordPath, next);
    // a stale socket (a daemon of this host that died) would make the listen fail
    rmSync(o.nbdSocket, { force: true });
    await q.execute('nbd-server-start', { addr: { type: 'unix', data: { path: o.nbdSocket } } });
    if (o.nbdTcp) await q.execute('x-nbd-server-listen', { addr: { type: 'inet', data: { host: o.nbdTcp.host, port: String(o.nbdTcp.port) } } });
    await q.execute('block-export-add', { type: 'nbd', id: SERVE_EXPORT, 'node-name': TAKEOVER_NODE, name: SERVE_EXPORT, writable: true });
    return { 'already-done': false, generation: next.current, 'last-checkpoint': iso(sec['last-checkpoint']), 'lease-waited-ms': Math.round(waited), serving };
  } finally {
    q.close();
  }
}
