// `lockstep pair status` for a person and for scripts: the human view (in the manner of
// `drbdadm status`), the one-line summary and the exit code of `--check`.
//
// The view reads the status object the supervisor returns (PairStatus) and also renders
// fields that only some supervisors provide, as soon as they are present:
//   generation       {primary?, secondary?}: each side's data generation
//   consistent       {primary?, secondary?}: whether that side's disk holds a consistent image
//   side-state       {primary?, secondary?}: 'up', 'down', 'unreachable', ... (else derived
//                    from the stage)
//   resync           {done, total, eta-seconds}: bytes copied so far, to copy, seconds left
//   late-heartbeats  {primary?, secondary?}: heartbeats answered late, per side
//   disks            {primary?, secondary?}: each disk's generation record ({generation,
//                    consistent, ...}: read when generation/consistent are absent)
//   heartbeats       {primary?, secondary?}: {late, max-late-ms}
//   sync             {kind, reason, source?}: what the last start decided about copying
//   last-checkpoint  time of the last checkpoint (ISO 8601 text or ms since the epoch)
//   sides            {primary?, secondary?}: {generation, consistent, role, changed-bytes,
//                    resync: {done, total, bytes-per-second, eta-seconds} | null}
//   split-brain      {reason, changed-bytes: {primary, secondary}, diverged-bytes, commands}
//   waiting-for-peer {side, address, since, attempts, last-error?, next-attempt-ms?}: after a
//                    failover across two hosts, the failed side's daemon awaited

import { bytesText, durationText, progressText } from './terminal.js';

export type Status = Record<string, unknown>;
type Side = 'primary' | 'secondary';

/** `lockstep pair status --check` exit codes (documented in docs/replication.md). */
export const CHECK_EXIT = {
  protected: 0,
  /** the command itself failed (a bad option, a malformed answer) */
  error: 1,
  /** starting, syncing or resyncing: not protected yet, nothing is wrong */
  'not-protected-yet': 2,
  /** the secondary is lost: the primary serves without protection */
  degraded: 3,
  /** the secondary serves the recovered disk, without protection */
  'failed-over': 4,
  /** the primary is lost and nothing serves the disk (manual failover awaited) */
  'primary-lost': 5,
  /** a stage this client does not know */
  unknown: 6,
  /** no supervisor answers on the control socket, or it is stopping */
  'not-running': 7,
  /** both disks changed since they diverged: nothing serves, `lockstep pair resolve` awaited */
  'split-brain': 8,
} as const;

export function checkCode(st: Status): number {
  const stage = String(st.stage);
  switch (stage) {
    case 'protected':
      return CHECK_EXIT.protected;
    case 'starting':
    case 'syncing':
    case 'resyncing':
      return CHECK_EXIT['not-protected-yet'];
    case 'degraded':
      return CHECK_EXIT.degraded;
    case 'failed-over':
      return CHECK_EXIT['failed-over'];
    case 'primary-lost':
      return CHECK_EXIT['primary-lost'];
    case 'stopped':
      return CHECK_EXIT['not-running'];
    case 'split-brain':
      return CHECK_EXIT['split-brain'];
    default:
      return CHECK_EXIT.unknown;
  }
}

const num = (v: unknown): number | null => (typeof v === 'number' && Number.isFinite(v) ? v : null);
const ms = (v: unknown): string => (num(v) === null ? '-' : `${num(v)! < 10 ? num(v)!.toFixed(2) : num(v)!.toFixed(0)} ms`);
const perSide = (st: Status, key: string, side: Side): unknown => {
  const o = st[key];
  return o && typeof o === 'object' ? (o as Record<string, unknown>)[side] : undefined;
};

/** A side's state: the supervisor's word when it gives one, else what the stage implies. */
export function sideState(st: Status, side: Side): string {
  const given = perSide(st, 'side-state', side);
  if (typeof given === 'string') return given;
  const stage = String(st.stage);
  if (stage === 'split-brain') return 'up, diverged';
  // by role: once a failover's survivor is re-protected the side started as secondary is the primary
  const swapped = st['primary-side'] === 'secondary';
  if ((side === 'primary') !== swapped) {
    if (stage === 'failed-over' || stage === 'primary-lost') return 'down';
    if (stage === 'stopped') return 'stopped';
    return stage === 'starting' ? 'starting' : 'up, serving';
  }
  if (stage === 'degraded') return 'down';
  if (stage === 'failed-over') return 'up, serving';
  if (stage === 'stopped') return 'stopped';
  if (stage === 'syncing') return 'up, sync target';
  if (stage === 'resyncing') return 'up, resync target';
  return stage === 'starting' ? 'starting' : 'up, replica';
}

/** A field of the side's disk record (`disks`, as the supervisor reports its generations). */
const diskField = (st: Status, side: Side, key: string): unknown => {
  const d = perSide(st, 'disks', side);
  return d && typeof d === 'object' ? (d as Record<string, unknown>)[key] : undefined;
};

function sideLine(st: Status, side: Side): string {
  const parts = [side.padEnd(10), sideState(st, side)];
  const gen = perSide(st, 'generation', side) ?? diskField(st, side, 'generation');
  if (gen !== undefined && gen !== null) parts.push(`generation ${String(gen)}`);
  const cons = perSide(st, 'consistent', side) ?? diskField(st, side, 'consistent');
  if (typeof cons === 'boolean') parts.push(cons ? 'consistent' : 'INCONSISTENT');
  const sideSt = perSide(st, 'sides', side) as { role?: unknown; 'changed-bytes'?: unknown; resync?: { done?: unknown; total?: unknown; 'bytes-per-second'?: unknown; 'eta-seconds'?: unknown } | null } | undefined;
  if (sideSt && typeof sideSt.role === 'string') parts.push(`role ${sideSt.role}`);
  if (sideSt && num(sideSt['changed-bytes']) !== null) parts.push(`changed ${bytesText(num(sideSt['changed-bytes'])!)}`);
  const rs = sideSt?.resync;
  if (rs && num(rs.done) !== null && num(rs.total) !== null) {
    parts.push(`resync target ${bytesText(num(rs.done)!)} of ${bytesText(num(rs.total)!)}${num(rs['bytes-per-second']) ? ` at ${bytesText(num(rs['bytes-per-second'])!)}/s` : ''}${num(rs['eta-seconds']) !== null ? `, ETA ${durationText(num(rs['eta-seconds'])!)}` : ''}`);
  }
  if ((side === 'primary') !== (st['primary-side'] === 'secondary') && num(st['heartbeat-age-ms']) !== null && parts[1]!.startsWith('up')) parts.push(`heartbeat ${ms(st['heartbeat-age-ms'])} ago`);
  const hb = perSide(st, 'heartbeats', side) as { late?: unknown; 'max-late-ms'?: unknown } | undefined;
  const late = num(perSide(st, 'late-heartbeats', side)) ?? num(hb?.late);
  if (late !== null) parts.push(`late heartbeats ${late}${num(hb?.['max-late-ms']) !== null ? ` (max ${ms(hb?.['max-late-ms'])})` : ''}`);
  return '  ' + parts.join('  ');
}

function lastCheckpointText(v: unknown, now: number): string | null {
  const t = typeof v === 'number' ? v : typeof v === 'string' ? Date.parse(v) : NaN;
  if (!Number.isFinite(t)) return null;
  return `${durationText((now - t) / 1000)} ago`;
}

/** The human view: a header, one line per side, then checkpoints, data and errors. */
export function renderStatus(st: Status, now = Date.now()): string {
  const lines: string[] = [];
  lines.push(`pair  stage ${String(st.stage)}  role ${String(st.role)}${st['primary-side'] === 'secondary' ? '  (roles swapped: the secondary daemon is the primary)' : ''}`);
  lines.push(sideLine(st, 'primary'), sideLine(st, 'secondary'));
  const cps = num(st.checkpoints) ?? 0;
  const failed = num(st['checkpoint-failures']) ?? 0;
  let cp = `  checkpoints ${cps}${failed ? ` (${failed} failed)` : ''}`;
  const last = lastCheckpointText(st['last-checkpoint'], now);
  if (last) cp += `, last ${last}`;
  if (cps > 0) cp += `  pause last ${ms(st['last-pause-ms'])}, median ${ms(st['pause-median-ms'])}, p99 ${ms(st['pause-p99-ms'])}`;
  lines.push(cp);
  const copied = num(st['hidden-copied-bytes']);
  if (copied !== null) lines.push(`  copied into the hidden disk ${bytesText(copied)} in all, ${num(st['dirty-clusters']) ?? '-'} clusters since the last checkpoint`);
  const resync = st.resync as { done?: unknown; total?: unknown; 'eta-seconds'?: unknown } | undefined;
  if (resync && typeof resync === 'object' && num(resync.done) !== null && num(resync.total) !== null) {
    lines.push(`  ${progressText('resync', num(resync.done)!, num(resync.total)!, num(resync['eta-seconds']))}`);
  }
  const changed = num(st['changed-bytes']);
  if (changed !== null) {
    lines.push(`  out of sync ${bytesText(changed)} (changed since the last confirmed checkpoint${st['changed-regions-file'] ? `, listed in ${String(st['changed-regions-file'])}` : ''})`);
  }
  const sync = st.sync as { kind?: unknown; reason?: unknown; source?: unknown } | undefined;
  if (sync && typeof sync === 'object' && sync.kind !== undefined) {
    lines.push(`  at start: ${String(sync.kind)}${sync.source ? ` from the ${String(sync.source)}` : ''}${sync.reason ? ` (${String(sync.reason)})` : ''}`);
  }
  const sb = st['split-brain'] as { reason?: unknown; 'diverged-bytes'?: unknown; commands?: unknown } | undefined;
  if (sb && typeof sb === 'object') {
    lines.push(`  SPLIT BRAIN: ${String(sb.reason)}`);
    const served = serving0(st).length > 0 ? `nothing is copied; the ${String(st['primary-side'] ?? 'primary')} daemon serves on, the other disk is fenced` : 'nothing is served or copied';
    if (num(sb['diverged-bytes']) !== null) lines.push(`  diverged regions ${bytesText(num(sb['diverged-bytes'])!)} (the union of both change records); ${served}`);
    if (Array.isArray(sb.commands)) for (const c of sb.commands) lines.push(`    ${String(c)}`);
  }
  const wait = st['waiting-for-peer'] as { side?: unknown; address?: unknown; since?: unknown; attempts?: unknown; 'last-error'?: unknown } | undefined;
  if (wait && typeof wait === 'object') {
    lines.push(`  waiting for the ${String(wait.side)} daemon at ${String(wait.address)} since ${String(wait.since)} (${String(wait.attempts)} attempts${wait['last-error'] ? `, last: ${String(wait['last-error'])}` : ''}): re-protects by itself when it answers`);
  }
  const serving = serving0(st);
  if (serving.length) lines.push(`  serving ${serving.map(String).join('\n          ')}`);
  if (st['last-error']) lines.push(`  last error: ${String(st['last-error'])}`);
  return lines.join('\n') + '\n';
}

const serving0 = (st: Status): unknown[] => (Array.isArray(st.serving) ? (st.serving as unknown[]) : []);

/** `--check`'s one line: "protected: primary serving, last pause 1.20 ms". */
export function checkLine(st: Status): string {
  const stage = String(st.stage);
  const extra: string[] = [String(st.role)];
  if (num(st['last-pause-ms']) !== null) extra.push(`last pause ${ms(st['last-pause-ms'])}`);
  if (num(st['changed-bytes']) !== null) extra.push(`out of sync ${bytesText(num(st['changed-bytes'])!)}`);
  if (st['last-error'] && stage !== 'protected') extra.push(String(st['last-error']));
  const sb = st['split-brain'] as { 'changed-bytes'?: { primary?: unknown; secondary?: unknown } } | undefined;
  if (sb?.['changed-bytes']) extra.push(`changed: primary ${bytesText(num(sb['changed-bytes'].primary) ?? 0)}, secondary ${bytesText(num(sb['changed-bytes'].secondary) ?? 0)}`);
  return `${stage}: ${extra.join(', ')}\n`;
}
