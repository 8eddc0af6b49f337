// What a pair supervisor is told (`lockstep pair`'s options, the demo's, the tests'), and the
// defaults the CLI fills in.

import type { PairSideName } from './generations.js';
import type { PairLeaseExpiry } from './lease.js';
import type { PairTls } from './sides.js';
import type { SocketAddress } from '../util/socket-address.js';

export interface PairOptions {
  dataDir: string;
  /** virtual size of the disk in bytes (used when the images are created) */
  size: number;
  checkpointIntervalMs: number;
  heartbeatIntervalMs: number;
  heartbeatTimeoutMs: number;
  /** a side whose silence cannot mean a cut link (a daemon started here, any secondary) is
   *  lost only after this long without an answer; before, it is late (default: 10 timeouts,
   *  at least 5 s) */
  heartbeatLostMs?: number;
  /** the primary's forward link's I/O timeout, ms (default: the secondary's loss bound, see
   *  forwardTimeoutS) */
  forwardTimeoutMs?: number;
  failover: 'auto' | 'manual';
  /** where the user's disk is served, on the serving side's host: a Unix socket (default
   *  DIR/disk.sock of the serving side) and, with nbdPort, TCP */
  nbdSocket?: string;
  nbdHost?: string;
  nbdPort?: number;
  /** attach to daemons already running instead of starting them */
  primaryQmp?: SocketAddress;
  secondaryQmp?: SocketAddress;
  /** data directories on each side's host (default: dataDir) */
  primaryDir?: string;
  secondaryDir?: string;
  /** where the secondary serves forwarded writes, as the primary reaches it (two hosts) */
  secondaryNbd?: { host: string; port: number };
  tls?: PairTls;
  /** allow plain TCP to non-loopback addresses */
  insecure?: boolean;
  log: (level: 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>) => void;
  /** the operator's word on which disk is current (a full sync from it); needed when a disk
   *  has no generation record, or to settle a split brain */
  forceCurrent?: PairSideName;
  /** output commit: a flush or FUA write completes once a checkpoint covers it (default on;
   *  off for COLO with a VM, whose outputs are held elsewhere) */
  flushCommit?: boolean;
  /** the primary's write lease, ms (default: the heartbeat timeout; 0 = no lease) */
  leaseMs?: number;
  /** writes once the primary's lease ran out: held until renewed (default) or EIO (lease.ts) */
  onLeaseExpiry?: PairLeaseExpiry;
  /** a lost secondary is brought back and resynced while the primary serves (default on):
   *  restarted here on one host, its QMP address retried on two */
  reprotect?: boolean;
  /** the first delay before bringing a lost secondary back, ms (doubles up to 30 s; default 1000) */
  reprotectBackoffMs?: number;
  /** a live resync's copy rate, bytes/s (the job's speed; default unlimited) */
  resyncRate?: number;
  /** the control socket `lockstep pair` serves (named in what a split brain says to run;
   *  default DATA/pair.sock) */
  control?: string;
  /** a live resync flushes the target and persists its mark after every this many bytes
   *  copied: about what a resync whose target dies copies again (default 64 MiB) */
  resyncPieceBytes?: number;
  /** what each disk's dirty log persists before the first write into it (its extent-size;
   *  default DIRTY_EXTENT_SIZE, 4 MiB): after a crash the resync copies whole extents */
  dirtyExtentBytes?: number;
  /** the secondary's copy-before-write unit, bytes: its hidden disk's cluster size too (setup.ts;
   *  default 64 KiB, QEMU's) */
  copyUnit?: number;
  /** progress of a copy (the initial sync, a failover's commit), for a terminal line */
  onProgress?: (done: number, total: number, etaSeconds: number | null, what?: 'initial sync' | 'resync' | 'failover commit' | 'split-brain save') => void;
}

export const PAIR_DEFAULTS = {
  size: 1024 ** 3,
  checkpointIntervalMs: 1000,
  heartbeatIntervalMs: 100,
  heartbeatTimeoutMs: 500,
  failover: 'auto' as const,
  nbdHost: '127.0.0.1',
  nbdPort: 10809,
  secondaryNbdPort: 10810,
};

/** How long a silent side that is not a remote primary may stay silent before it is lost
 *  (liveness.ts's long bound): heartbeatLostMs, or 10 timeouts and at least 5 s. */
export function longBoundMs(o: Pick<PairOptions, 'heartbeatLostMs' | 'heartbeatTimeoutMs'>): number {
  return o.heartbeatLostMs ?? Math.max(5000, 10 * o.heartbeatTimeoutMs);
}

/**
 * The forward link's I/O timeout in whole seconds. A forward that times out leaves the
 * secondary without a write the primary acknowledged (the forward does not vote), so from
 * then on no checkpoint may succeed: it must not be shorter than the stall the pair tolerates
 * from a live secondary (late, not lost). A longer stall makes the secondary lost: degraded,
 * flushes complete on the primary alone, and the secondary is brought back with a resync.
 */
export function forwardTimeoutS(o: Pick<PairOptions, 'heartbeatLostMs' | 'heartbeatTimeoutMs' | 'forwardTimeoutMs'>): number {
  return Math.max(1, Math.ceil((o.forwardTimeoutMs ?? longBoundMs(o)) / 1000));
}
