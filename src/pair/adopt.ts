// A supervisor that dies and comes back (issue 15 item 10). The daemons a one-host supervisor
// starts run in their own session (a SIGKILL, a Ctrl-C or a closed terminal of the supervisor
// does not reach them) and log to files in the data directory, so they keep serving the disk
// when the supervisor dies. Beside them the supervisor keeps a small crash-safe record,
// DATA/pair-daemons.json (pids, QMP sockets, roles, the pair's stage and generation), rewritten
// at every stage change. A restarted `lockstep pair` reads it before starting anything: the
// daemons still alive are checked against it (the pid runs a lockstep daemon on that QMP
// socket, QMP answers, the block graph is the layout of the recorded stage) and adopted; the
// supervisor then resumes from the recorded stage (resume.ts). What does not match
// is refused with the pids and what to do; a record whose daemons are all gone is dropped and
// the pair starts as usual (the generations decide what is copied).

import { readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { QmpClient } from '../qmp/client.js';
import { errorMessage } from '../errors.js';
import { writeFileDurably } from './meta-store.js';
import { DISK_NODE, FORWARD_EXPORT, PRIMARY_LOCAL, PRIMARY_LOG, SECONDARY_DISK } from './setup.js';
import type { PairStage } from './stages.js';
import type { PairCore, PairLog } from './core.js';
import { daemonLogPath, type Side, type SideName } from './sides.js';
import type { PairDisk } from './disks.js';
import type { PairSideName } from './generations.js';
import type { PairOptions } from './options.js';

export const DAEMONS_FILE = 'pair-daemons.json';
const FORMAT = 'lockstep-pair-daemons';

export interface DaemonEntry {
  pid: number;
  /** the daemon's QMP socket */
  qmp: string;
  /** its log file (stderr) */
  log: string;
}

export interface DaemonsRecord {
  format: typeof FORMAT;
  version: 1;
  /** the supervisor that wrote it */
  supervisor: number;
  stage: PairStage;
  /** the daemons by the side they were started as; null once gone (failover, lost secondary) */
  primary: DaemonEntry | null;
  secondary: DaemonEntry | null;
  /** the side whose daemon plays the primary when not the one started as primary (a
   *  failover's survivor re-protected: roles swapped); absent: 'primary' */
  'primary-side'?: SideName;
  /** the disks' generations when it was written, for people and for the check at adoption */
  generation: { primary: string | null; secondary: string | null };
  /** the addresses the disk is served at */
  serving: string[];
  updated: string;
}

export class PairAdoptError extends Error {
  readonly code = 'EADOPT';
}

export function daemonsPath(dataDir: string): string {
  return join(dataDir, DAEMONS_FILE);
}

export function writeDaemons(dataDir: string, r: Omit<DaemonsRecord, 'format' | 'version' | 'updated' | 'supervisor'>): void {
  const full: DaemonsRecord = { format: FORMAT, version: 1, supervisor: process.pid, ...r, updated: new Date().toISOString() };
  writeFileDurably(daemonsPath(dataDir), JSON.stringify(full, null, 1) + '\n');
}

export function removeDaemons(dataDir: string): void {
  rmSync(daemonsPath(dataDir), { force: true });
}

function isEntry(e: unknown): e is DaemonEntry | null {
  if (e === null) return true;
  const x = e as DaemonEntry;
  return typeof x === 'object' && Number.isInteger(x.pid) && x.pid > 0 && typeof x.qmp === 'string' && typeof x.log === 'string';
}

/** The record, or null when there is none; a malformed one is an error naming the file. */
export function readDaemons(dataDir: string): DaemonsRecord | null {
  const path = daemonsPath(dataDir);
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw new PairAdoptError(`cannot read ${path}: ${errorMessage(e)}`);
  }
  let r: DaemonsRecord;
  try {
    r = JSON.parse(text) as DaemonsRecord;
  } catch {
    throw new PairAdoptError(`${path}: not a lockstep pair daemons record (malformed JSON); remove it once no daemon of this data directory runs`);
  }
  const ps = r?.['primary-side'];
  if (r?.format !== FORMAT || r.version !== 1 || typeof r.stage !== 'string' || !isEntry(r.primary) || !isEntry(r.secondary) || !Array.isArray(r.serving) || (ps !== undefined && ps !== 'primary' && ps !== 'secondary')) {
    throw new PairAdoptError(`${path}: not a lockstep pair daemons record (format ${FORMAT}, version 1)`);
  }
  return r;
}

/** The process runs (EPERM: it exists, owned by someone else). A zombie does not: a daemon
 *  whose supervisor died was reparented, and its new parent may reap it late or never. */
export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EPERM') return false;
  }
  return !isZombie(pid);
}

function cmdline(pid: number): string[] | null {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
  } catch {
    return null;
  }
}

/** A live pid that is a `lockstep pair` supervisor (not a reused pid). */
export function isSupervisor(pid: number): boolean {
  if (pid === process.pid || !pidAlive(pid)) return false;
  const args = cmdline(pid);
  return args !== null && args.some((a) => /lockstep$/.test(a)) && args.includes('pair');
}

/** The block nodes a side has in each stage its daemon can be adopted in. `primarySide`: the
 *  side playing the primary (the secondary's once roles are swapped: its disk's nodes and the
 *  served quorum over the replication node the failover left). */
export function expectedNodes(side: SideName, stage: PairStage, primarySide: SideName = 'primary'): string[] {
  // before replication runs the daemons are retired, not adopted: any layout will do
  if (stage === 'starting' || stage === 'syncing' || stage === 'split-brain') return [];
  const disk = side === 'primary' ? [PRIMARY_LOCAL, PRIMARY_LOG] : [SECONDARY_DISK, FORWARD_EXPORT];
  if (side === primarySide) return side === 'primary' ? [...disk, DISK_NODE] : [...disk, 'childs0', DISK_NODE];
  // a secondary (after the failover commit a survivor serves childs0, its disk below it)
  return [...disk, 'childs0'];
}

export interface FoundDaemon {
  name: SideName;
  pid: number;
  qmpPath: string;
  qmp: QmpClient;
}

export type Probe = { state: 'alive'; daemon: FoundDaemon } | { state: 'gone' } | { state: 'mismatch'; why: string };

/** Checks that the recorded daemon runs and is what the record says. */
export async function probeDaemon(name: SideName, e: DaemonEntry, stage: PairStage, timeoutMs: number, primarySide: SideName = 'primary'): Promise<Probe> {
  if (!pidAlive(e.pid)) return { state: 'gone' };
  const args = cmdline(e.pid);
  // a reused pid: some other process, not our daemon (it may be gone since)
  if (args === null || !args.includes('daemon') || !args.some((a) => a.includes(`path=${e.qmp},`))) return { state: 'gone' };
  let qmp: QmpClient;
  try {
    qmp = await QmpClient.open({ type: 'unix', path: e.qmp }, { timeoutMs });
  } catch (err) {
    return { state: 'mismatch', why: `the ${name} daemon (pid ${e.pid}) runs but its QMP socket ${e.qmp} does not answer (${errorMessage(err)})` };
  }
  try {
    const nodes = ((await qmp.execute('query-named-block-nodes', { flat: true })) as Array<{ 'node-name': string }>).map((n) => n['node-name']);
    const missing = expectedNodes(name, stage, primarySide).filter((n) => !nodes.includes(n));
    if (missing.length > 0) {
      qmp.close();
      return { state: 'mismatch', why: `the ${name} daemon (pid ${e.pid}) does not have the ${stage} pair's layout (no node ${missing.join(', ')}; it has ${nodes.filter((n) => !n.startsWith('#')).join(', ') || 'none'})` };
    }
  } catch (err) {
    qmp.close();
    return { state: 'mismatch', why: `the ${name} daemon (pid ${e.pid}) did not answer query-named-block-nodes: ${errorMessage(err)}` };
  }
  return { state: 'alive', daemon: { name, pid: e.pid, qmpPath: e.qmp, qmp } };
}

export interface Found {
  record: DaemonsRecord;
  primary: FoundDaemon | null;
  secondary: FoundDaemon | null;
}

/**
 * Reads the record of the last run in `dataDir` and probes its daemons. null: no record, or
 * none of its daemons runs any more (the record and their stale sockets are removed). Throws
 * PairAdoptError when another supervisor runs or a daemon does not match.
 */
export async function findDaemons(dataDir: string, log: PairLog, timeoutMs: number): Promise<Found | null> {
  const record = readDaemons(dataDir);
  if (!record) return null;
  if (isSupervisor(record.supervisor)) {
    throw new PairAdoptError(`another lockstep pair supervisor (pid ${record.supervisor}) runs on ${dataDir}: stop it first, or give this one another --data-dir`);
  }
  const probes: Partial<Record<SideName, Probe>> = {};
  for (const name of ['primary', 'secondary'] as const) {
    const e = record[name];
    probes[name] = e ? await probeDaemon(name, e, record.stage, timeoutMs, record['primary-side'] ?? 'primary') : { state: 'gone' };
  }
  const bad = (['primary', 'secondary'] as const).filter((n) => probes[n]!.state === 'mismatch');
  if (bad.length > 0) {
    for (const n of ['primary', 'secondary'] as const) {
      const p = probes[n]!;
      if (p.state === 'alive') p.daemon.qmp.close();
    }
    const pids = bad.map((n) => record[n]!.pid).join(' ');
    throw new PairAdoptError(
      `cannot adopt the daemons of the last run (${daemonsPath(dataDir)}): ${bad.map((n) => (probes[n] as { why: string }).why).join('; ')}. ` +
        `Nothing was changed. If no other program uses them, stop them (kill ${pids}), then start the pair again: the disks' generations decide what is copied`,
    );
  }
  const alive = (n: SideName): FoundDaemon | null => {
    const p = probes[n]!;
    return p.state === 'alive' ? p.daemon : null;
  };
  const found: Found = { record, primary: alive('primary'), secondary: alive('secondary') };
  if (!found.primary && !found.secondary) {
    log('info', 'the daemons of the last run are gone: starting the pair afresh', { record: daemonsPath(dataDir), stage: record.stage });
    removeDaemons(dataDir);
    return null;
  }
  return found;
}

/** Ends a found daemon we will not adopt (quit over QMP, SIGKILL if it lingers). */
export async function retire(d: FoundDaemon, waitMs = 5000): Promise<void> {
  await d.qmp.execute('quit').catch(() => {});
  d.qmp.close();
  await waitGone(d.pid, waitMs);
}

/** Waits until `pid` has exited; SIGKILL after `waitMs`. */
export async function waitGone(pid: number, waitMs: number): Promise<void> {
  const t0 = Date.now();
  while (pidAlive(pid)) {
    if (Date.now() - t0 > waitMs) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone meanwhile
      }
      await new Promise((r) => setTimeout(r, 50));
      return;
    }
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A zombie holds its pid until its parent reaps it, but it is no longer running. */
function isZombie(pid: number): boolean {
  try {
    return /^\d+ \(.*\) Z/.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return false;
  }
}

/** What recording the daemons reads and sets on the supervisor. */
export interface RecordHost extends PairCore {
  readonly opts: PairOptions;
  readonly disks: Record<PairSideName, PairDisk | null>;
  readonly serving: string[];
  /** this supervisor wrote DATA/pair-daemons.json (started or adopted daemons) */
  recorded: boolean;
  /** both daemons are started here (not attached): they can be recorded and adopted */
  readonly oneHost: boolean;
  readonly primarySide: SideName;
  sideNamed(name: SideName): Side | null;
}

/** Rewrites DATA/pair-daemons.json: who the daemons are, the stage, the generations. */
export function recordDaemons(sup: RecordHost): void {
  if (!sup.oneHost) return;
  const entry = (side: Side | null) => {
    const pid = side?.child?.pid ?? side?.pid;
    if (!side || !side.alive || pid === undefined) return null;
    return { pid, qmp: join(sup.opts.dataDir, `${side.name}.qmp`), log: daemonLogPath(sup.opts.dataDir, side.name) };
  };
  try {
    sup.recorded = true;
    // by the side each daemon was started as; which one plays the primary beside
    const ps = sup.primarySide;
    writeDaemons(sup.opts.dataDir, {
      stage: sup.stages.stage,
      primary: entry(sup.sideNamed('primary')),
      secondary: entry(sup.sideNamed('secondary')),
      ...(ps === 'secondary' ? { 'primary-side': ps } : {}),
      generation: { primary: sup.disks.primary?.meta?.current ?? null, secondary: sup.disks.secondary?.meta?.current ?? null },
      serving: sup.serving,
    });
  } catch (e) {
    sup.opts.log('warn', `cannot write the daemons record: ${errorMessage(e)}`);
  }
}
