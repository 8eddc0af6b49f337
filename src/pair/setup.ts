// What the supervisor builds on each daemon over QMP: the images (created where missing, the
// overlays always fresh), the secondary's graph and its NBD export for the forwarded writes,
// and the primary's quorum. The same QMP conversation serves a daemon the supervisor started
// on this host and one running on another host; only image creation differs (a local file
// write, or `blockdev-create` on the remote daemon).

import { existsSync, rmSync } from 'node:fs';
import { posix } from 'node:path';
import type { QmpClient } from '../qmp/client.js';
import { QmpCommandError } from '../qmp/client.js';
import { createQcow2 } from '../block/drivers/qcow2/create.js';
import type { SocketAddress } from '../util/socket-address.js';

export const DISK_NODE = 'colo-disk0';
export const FORWARD_EXPORT = 'parent0';

/** Where the primary reaches the secondary's export of forwarded writes. */

export interface SideLayout {
  dir: string;
  /** the daemon runs on this host (files can be created directly) */
  local: boolean;
  /** the dirty logs' extent-size (default DIRTY_EXTENT_SIZE) */
  dirtyExtentBytes?: number;
  /** the secondary's copy-before-write unit, and its hidden disk's cluster size (default
   *  QEMU's: 64 KiB both); PAIR_COPY_UNITS lists the values a pair accepts */
  copyUnit?: number;
}

/** The copy units `lockstep pair run --copy-unit` accepts: powers of two from 4 KiB to 64 KiB
 *  (from 4 KiB a guest's 4 KiB write copies no more than it writes; above 64 KiB nothing is
 *  gained over QEMU's unit). */
export const PAIR_COPY_UNITS = [4096, 8192, 16384, 32768, 65536] as const;

/** The cluster size an image of the pair is created with: a hidden disk's is the copy unit
 *  (a smaller one would break the data rule, a larger one waste the small unit), any other
 *  image's qcow2's default. */
export function clusterSizeFor(side: SideLayout, name: string): number | undefined {
  const hidden = name === OVERLAYS.secondary.hidden || name === OVERLAYS.primary.hidden;
  return side.copyUnit !== undefined && hidden ? side.copyUnit : undefined;
}

export function imagePath(side: SideLayout, name: string): string {
  return posix.join(side.dir, name);
}

/** Runs a job-creating command and waits for it to conclude; its error becomes ours. */
async function runCreateJob(q: QmpClient, jobId: string, options: Record<string, unknown>, timeoutMs: number): Promise<void> {
  const concluded = q.waitEvent('JOB_STATUS_CHANGE', (d) => d.id === jobId && d.status === 'concluded', timeoutMs);
  concluded.catch(() => {}); // observed below, unless the command itself fails first
  await q.execute('blockdev-create', { 'job-id': jobId, options });
  await concluded;
  const jobs = (await q.execute('query-jobs')) as Array<{ id: string; error?: string }>;
  const err = jobs.find((j) => j.id === jobId)?.error;
  await q.execute('job-dismiss', { id: jobId });
  if (err) throw new Error(`creating ${String(options.filename ?? options.file)} failed: ${err}`);
}

/** Creates a qcow2 image of `size` on the daemon's host unless it exists and `keep` is set. */
export async function ensureImage(q: QmpClient, side: SideLayout, name: string, size: number, keep: boolean): Promise<'kept' | 'created'> {
  const path = imagePath(side, name);
  const clusterSize = clusterSizeFor(side, name);
  if (side.local) {
    if (keep && existsSync(path)) return 'kept';
    rmSync(path, { force: true });
    await createQcow2(path, { size, ...(clusterSize !== undefined ? { clusterSize } : {}) });
    return 'created';
  }
  // node names have at most 31 characters (as in QEMU); a long image name is cut
  const probe = `pair-probe-${name.replace(/[^A-Za-z0-9]/g, '-')}`.slice(0, 31);
  if (keep) {
    try {
      await q.execute('blockdev-add', { driver: 'file', 'node-name': probe, filename: path, 'read-only': true });
      await q.execute('blockdev-del', { 'node-name': probe });
      return 'kept';
    } catch (e) {
      if (!(e instanceof QmpCommandError) || !/No such file or directory/.test(e.desc)) throw e;
    }
  }
  await runCreateJob(q, `${probe}-file`, { driver: 'file', filename: path, size: 0 }, 30_000);
  await q.execute('blockdev-add', { driver: 'file', 'node-name': probe, filename: path });
  try {
    await runCreateJob(q, `${probe}-qcow2`, { driver: 'qcow2', file: probe, size, ...(clusterSize !== undefined ? { 'cluster-size': clusterSize } : {}) }, 30_000);
  } finally {
    await q.execute('blockdev-del', { 'node-name': probe });
  }
  return 'created';
}

const qcow2Node = (filename: string) => ({ driver: 'qcow2', file: { driver: 'file', filename } });
// The overlays are scratch space: recreated empty at every start (after which a full sync
// runs), and read by the failover commit from the running daemon, never after a crash. Their
// flushes would only lengthen every checkpoint (make_empty orders its metadata writes with one).
const scratchNode = (filename: string) => ({ driver: 'qcow2', file: { driver: 'file', filename, cache: { 'no-flush': true } } });

/** The secondary: its disk, the replication filter over active -> hidden -> disk, and the
 *  writable export the primary forwards to. `name` is the disk's side: after a failover the
 *  old primary's disk returns as the secondary of the survivor (roles swapped), built around
 *  primary.qcow2 under its own dirty log (LOG_NODE.primary, exported as FORWARD_EXPORT) with
 *  overlays of their own names: on one host the survivor still holds active/hidden.qcow2. */
export async function buildSecondary(q: QmpClient, side: SideLayout, forward: SocketAddress, tlsCreds: string | undefined, name: 'primary' | 'secondary' = 'secondary'): Promise<void> {
  // The disk sits under its dirty log: forwarded writes, the failover commit (which writes
  // into the backing node below the overlays) and, after failover, the survivor's own writes
  // all pass through it, so the survivor's record covers everything that differs from the
  // last checkpoint.
  await q.execute('blockdev-add', { 'node-name': DISK_NODES[name], ...qcow2Node(imagePath(side, DISK_FILES[name])) });
  await q.execute('blockdev-add', { driver: 'dirty-log', 'node-name': LOG_NODE[name], file: DISK_NODES[name], filename: dirtyLogPath(side, name), 'extent-size': side.dirtyExtentBytes ?? DIRTY_EXTENT_SIZE });
  await q.execute('blockdev-add', {
    driver: 'replication',
    'node-name': 'childs0',
    mode: 'secondary',
    'top-id': 'childs0',
    ...(side.copyUnit !== undefined ? { 'x-copy-unit': side.copyUnit } : {}),
    file: { ...scratchNode(imagePath(side, OVERLAYS[name].active)), backing: { ...scratchNode(imagePath(side, OVERLAYS[name].hidden)), backing: LOG_NODE[name] } },
  });
  await q.execute('nbd-server-start', { addr: serverAddr(forward), ...(tlsCreds ? { 'tls-creds': tlsCreds } : {}) });
  await q.execute('block-export-add', { type: 'nbd', id: FORWARD_EXPORT, 'node-name': LOG_NODE[name], name: FORWARD_EXPORT, writable: true });
}

/** The secondary's overlays by the disk's side: the old primary's disk, returning as a
 *  secondary after failover, gets its own (on one host both daemons share the directory). */
export const OVERLAYS = {
  secondary: { active: 'active.qcow2', hidden: 'hidden.qcow2' },
  primary: { active: 'primary-active.qcow2', hidden: 'primary-hidden.qcow2' },
} as const;

const DISK_FILES = { primary: 'primary.qcow2', secondary: 'secondary.qcow2' } as const;

export const PRIMARY_LOCAL = 'local0';
/** The primary's dirty-log filter over local0: the quorum's child. */
export const PRIMARY_LOG = 'local0-log';
/** The secondary's qcow2 disk; the dirty-log filter above it is FORWARD_EXPORT. */
export const SECONDARY_DISK = 'secondary-disk0';
/** Each disk's dirty-log node (what x-dirty-log-* commands name), whichever role its daemon plays. */
export const LOG_NODE = { primary: PRIMARY_LOG, secondary: FORWARD_EXPORT } as const;
/** Each disk's qcow2 node. */
export const DISK_NODES = { primary: PRIMARY_LOCAL, secondary: SECONDARY_DISK } as const;

/** What each disk's dirty log persists before the first write into it (DRBD's activity-log
 *  extent): with 64 KiB granules persisted one by one, random writes paid an fdatasync of the
 *  log nearly every time, on both daemons. The granule bits reach the file lazily; after a
 *  crash the resync copies whole extents. */
export const DIRTY_EXTENT_SIZE = 4 * 1024 * 1024;

/** The dirty log of a side's disk, beside it. */
export function dirtyLogPath(side: SideLayout, name: 'primary' | 'secondary'): string {
  return imagePath(side, `${name}.qcow2.dirty`);
}

/** The primary: its local disk under a quorum that the replication filter joins later. */
export async function buildPrimary(q: QmpClient, side: SideLayout): Promise<void> {
  await addPrimaryDisk(q, side);
  await addPrimaryQuorum(q);
}

/** The primary's disk under its dirty log (a resync from the secondary writes into it before the quorum is built). */
export async function addPrimaryDisk(q: QmpClient, side: SideLayout): Promise<void> {
  await q.execute('blockdev-add', { 'node-name': PRIMARY_LOCAL, ...qcow2Node(imagePath(side, 'primary.qcow2')) });
  await q.execute('blockdev-add', { driver: 'dirty-log', 'node-name': PRIMARY_LOG, file: PRIMARY_LOCAL, filename: dirtyLogPath(side, 'primary'), 'extent-size': side.dirtyExtentBytes ?? DIRTY_EXTENT_SIZE });
}

export async function addPrimaryQuorum(q: QmpClient): Promise<void> {
  await q.execute('blockdev-add', { driver: 'quorum', 'node-name': DISK_NODE, 'read-pattern': 'fifo', 'vote-threshold': 1, children: [PRIMARY_LOG] });
}

export function serverAddr(a: SocketAddress): { type: 'unix'; data: { path: string } } | { type: 'inet'; data: { host: string; port: string } } {
  return a.type === 'unix' ? { type: 'unix', data: { path: a.path } } : { type: 'inet', data: { host: a.host, port: String(a.port) } };
}

/** blockdev-add options of an nbd node that reaches the secondary's forward export. */
export function forwardNode(a: SocketAddress, tlsCreds: string | undefined, ioTimeoutS: number): Record<string, unknown> {
  return {
    driver: 'nbd',
    server: a.type === 'unix' ? { type: 'unix', path: a.path } : { type: 'inet', host: a.host, port: String(a.port) },
    export: FORWARD_EXPORT,
    ...(tlsCreds ? { 'tls-creds': tlsCreds } : {}),
    ...(ioTimeoutS > 0 ? { 'x-io-timeout': ioTimeoutS } : {}),
  };
}
