// The pair's figures in Prometheus' text exposition format (version 0.0.4). Names follow
// Prometheus' conventions (base units, `_total` on counters) and, where the meaning is the
// same, drbd-reactor's (`drbd_resource_role`, `drbd_connection_state`, the `drbd_device_*`
// prefix for a side's disk,
// `drbd_peerdevice_outofsync_bytes`, and the byte counters `drbd_device_written_bytes_total`,
// `drbd_peerdevice_sent_bytes_total`, `drbd_peerdevice_received_bytes_total`): enumerations are one series per value, 1 for the
// current one and 0 for the others, as drbd-reactor does with `enums = true`. The list is in
// docs/replication.md. Hand-written rather than a dependency: a dozen series do not need a
// registry library.

export class Histogram {
  private readonly counts: number[];
  private sum = 0;
  private count = 0;
  /** recent samples for median/p99 in status (bounded ring) */
  private readonly recent: number[] = [];

  constructor(
    readonly name: string,
    readonly help: string,
    /** upper bounds in seconds */
    readonly buckets: readonly number[],
  ) {
    this.counts = buckets.map(() => 0);
  }

  observe(seconds: number): void {
    this.sum += seconds;
    this.count++;
    this.buckets.forEach((b, i) => {
      if (seconds <= b) this.counts[i]!++;
    });
    this.recent.push(seconds);
    if (this.recent.length > 4096) this.recent.shift();
  }

  quantile(q: number): number | null {
    if (this.recent.length === 0) return null;
    const sorted = [...this.recent].sort((a, b) => a - b);
    return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]!;
  }

  render(): string {
    const lines = [`# HELP ${this.name} ${this.help}`, `# TYPE ${this.name} histogram`];
    this.buckets.forEach((b, i) => lines.push(`${this.name}_bucket{le="${b}"} ${this.counts[i]}`));
    lines.push(`${this.name}_bucket{le="+Inf"} ${this.count}`, `${this.name}_sum ${this.sum}`, `${this.name}_count ${this.count}`);
    return lines.join('\n');
  }
}

const PAUSE_BUCKETS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1];

export const PAIR_STAGES = ['starting', 'syncing', 'protected', 'primary-lost', 'failed-over', 'degraded', 'resyncing', 'split-brain', 'stopped'] as const;
/** drbd-reactor's role values: Primary serves the disk, Secondary is the replica, Unknown is lost */
export const ROLES = ['Primary', 'Secondary', 'Unknown'] as const;
/** a subset of DRBD's connection states, for the link between the two sides */
export const CONNECTION_STATES = ['Connecting', 'Connected', 'Unconnected', 'StandAlone'] as const;

type Role = (typeof ROLES)[number];
type ConnectionState = (typeof CONNECTION_STATES)[number];

/** The fields of the supervisor's status that the scrape reads. */
export interface MetricsStatus {
  stage: string;
  /** the side whose daemon plays the primary, when not the one started as primary */
  'primary-side'?: 'primary' | 'secondary';
  'changed-bytes'?: number;
  resync?: { done: number; total: number; 'bytes-per-second'?: number };
  /** per side: bytes its disk changed that the peer lacks (null: unknown) */
  sides?: Partial<
    Record<
      'primary' | 'secondary',
      { 'changed-bytes': number | null; resync?: { 'bytes-per-second': number } | null; role?: Role; generation?: string | null; consistent?: boolean | null }
    >
  >;
}

/** A label value in the text format: backslash, double quote and newline escaped. */
function labelValue(v: string): string {
  return v.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n');
}

/** A copy's rate: bytes done since the first sample over the time since (0 until two samples). */
export class RateMeter {
  private first: { at: number; done: number } | null = null;
  private key: unknown = null;

  /** `key` names the copy (a new one restarts the measure); `at` in ms. */
  sample(key: unknown, done: number, at: number): number {
    if (key !== this.key || !this.first || done < this.first.done) {
      this.key = key;
      this.first = { at, done };
      return 0;
    }
    const s = (at - this.first.at) / 1000;
    return s > 0 ? (done - this.first.done) / s : 0;
  }
}

/** Each side's role from the pair's stage. `primarySide`: the side whose daemon plays the
 *  primary (the secondary's once a failover's survivor was re-protected: roles swapped). */
export function sideRoles(stage: string, primarySide: 'primary' | 'secondary' = 'primary'): { primary: Role; secondary: Role } {
  const r = rolesByRole(stage);
  return primarySide === 'primary' ? r : { primary: r.secondary, secondary: r.primary };
}

function rolesByRole(stage: string): { primary: Role; secondary: Role } {
  switch (stage) {
    case 'failed-over':
      return { primary: 'Unknown', secondary: 'Primary' };
    case 'primary-lost':
      return { primary: 'Unknown', secondary: 'Secondary' };
    case 'degraded':
      return { primary: 'Primary', secondary: 'Unknown' };
    case 'split-brain':
      // as DRBD after a split brain: both StandAlone, neither serves
      return { primary: 'Secondary', secondary: 'Secondary' };
    default:
      return { primary: 'Primary', secondary: 'Secondary' };
  }
}

/** The state of the replication link between the sides, from the pair's stage. */
export function connectionState(stage: string): ConnectionState {
  switch (stage) {
    case 'starting':
      return 'Connecting';
    case 'degraded':
    case 'primary-lost':
      return 'Unconnected';
    case 'failed-over':
    case 'split-brain':
    case 'stopped':
      return 'StandAlone';
    default:
      return 'Connected';
  }
}

export class PairMetrics {
  checkpoints = 0;
  checkpointFailures = 0;
  /** bytes the secondary copied into its hidden disk (copy-before-write) since replication started */
  hiddenCopiedBytes = 0;
  /** clusters copied into the hidden disk since the last checkpoint (wire: 'dirty-clusters', lockstep_pair_hidden_dirty_clusters) */
  hiddenCopiedClusters = 0;
  /** bytes clients wrote to the primary's served disk (as drbd_device_written_bytes_total) */
  writtenBytes = 0;
  /** bytes the primary forwarded to the secondary (as drbd_peerdevice_sent_bytes_total) */
  sentBytes = 0;
  /** bytes the secondary received through its forward export (as drbd_peerdevice_received_bytes_total) */
  receivedBytes = 0;
  heartbeatAgeSeconds = 0;
  /** degraded: bytes the primary changed since the last checkpoint the secondary confirmed */
  changedBytes = 0;
  /** heartbeats past the timeout, per side, and the longest wait for an answer */
  heartbeatsLate: { primary: number; secondary: number } = { primary: 0, secondary: 0 };
  heartbeatMaxLateSeconds: { primary: number; secondary: number } = { primary: 0, secondary: 0 };
  readonly pause = new Histogram('lockstep_pair_checkpoint_pause_seconds', 'Time guest writes were held for a checkpoint', PAUSE_BUCKETS);
  readonly checkpointTime = new Histogram(
    'lockstep_pair_secondary_checkpoint_seconds',
    "Time of the secondary's checkpoint command within each pause",
    PAUSE_BUCKETS,
  );

  render(st: MetricsStatus): string {
    const head = (name: string, help: string, type: string) => `# HELP ${name} ${help}\n# TYPE ${name} ${type}`;
    const one = (name: string, help: string, v: number, type = 'gauge') => `${head(name, help, type)}\n${name} ${v}`;
    // the status's own per-side roles when it has them (a split brain found while the survivor
    // serves: that side is Primary), else from the stage
    const sr = st.sides;
    const roles = sr?.primary?.role && sr.secondary?.role ? { primary: sr.primary.role, secondary: sr.secondary.role } : sideRoles(st.stage, st['primary-side']);
    const conn = connectionState(st.stage);
    const out = [
      head('lockstep_pair_stage', "The pair's stage: 1 for the current one, 0 for the others", 'gauge'),
      ...PAIR_STAGES.map((s) => `lockstep_pair_stage{stage="${s}"} ${s === st.stage ? 1 : 0}`),
      head('lockstep_pair_role', "Each side's role (as drbd_resource_role): Primary serves the disk, Secondary is the replica, Unknown is lost", 'gauge'),
      ...(['primary', 'secondary'] as const).flatMap((side) => ROLES.map((r) => `lockstep_pair_role{side="${side}",role="${r}"} ${roles[side] === r ? 1 : 0}`)),
      head('lockstep_pair_connection_state', 'State of the replication link between the sides (as drbd_connection_state)', 'gauge'),
      ...CONNECTION_STATES.map((c) => `lockstep_pair_connection_state{state="${c}"} ${c === conn ? 1 : 0}`),
    ];
    // known only while protected (every write reaches the peer: 0), degraded (the changes
    // since the last confirmed checkpoint) or resyncing (what is left to copy)
    const oos = st.resync ? Math.max(0, st.resync.total - st.resync.done) : st.stage === 'degraded' ? (st['changed-bytes'] ?? this.changedBytes) : st.stage === 'protected' ? 0 : null;
    out.push(head('lockstep_pair_peerdevice_outofsync_bytes', 'Bytes the peer lacks from the serving side since the last checkpoint it confirmed (as drbd_peerdevice_outofsync_bytes); absent when unknown', 'gauge'));
    if (oos !== null) out.push(`lockstep_pair_peerdevice_outofsync_bytes{peer="${roles.primary === 'Primary' ? 'secondary' : 'primary'}",disk="disk"} ${oos}`);
    out.push(head('lockstep_pair_side_changed_bytes', "Bytes each side's disk changed that its peer lacks, from its change record (split brain: since the common generation); absent when unknown", 'gauge'));
    for (const side of ['primary', 'secondary'] as const) {
      const v = st.sides?.[side]?.['changed-bytes'];
      if (typeof v === 'number') out.push(`lockstep_pair_side_changed_bytes{side="${side}"} ${v}`);
    }
    // each disk's record as the status has it: consistent as DRBD's disk state is not
    // Inconsistent; the generation as an info series, rebuilt from the status at every scrape
    // so that an id that changed leaves no stale series behind
    out.push(head('lockstep_pair_device_consistent', "1 when the side's disk is consistent (may be a resync source, served or promoted), 0 while it is a resync target (drbd_device_state Inconsistent); absent when unknown", 'gauge'));
    for (const side of ['primary', 'secondary'] as const) {
      const c = st.sides?.[side]?.consistent;
      if (typeof c === 'boolean') out.push(`lockstep_pair_device_consistent{side="${side}"} ${c ? 1 : 0}`);
    }
    out.push(head('lockstep_pair_device_generation_info', "The current generation id of the side's disk, as a label (value 1); absent when unknown", 'gauge'));
    for (const side of ['primary', 'secondary'] as const) {
      const g = st.sides?.[side]?.generation;
      if (typeof g === 'string') out.push(`lockstep_pair_device_generation_info{side="${side}",generation="${labelValue(g)}"} 1`);
    }
    // a live resync, or a start's (or a resolve's) copy onto either side
    const rate = st.resync?.['bytes-per-second'] ?? st.sides?.primary?.resync?.['bytes-per-second'] ?? st.sides?.secondary?.resync?.['bytes-per-second'] ?? 0;
    out.push(one('lockstep_pair_resync_bytes_per_second', 'The running resync\'s copy rate since it began (0 when none runs)', rate));
    out.push(
      one('lockstep_pair_checkpoints_total', 'Checkpoints taken', this.checkpoints, 'counter'),
      one('lockstep_pair_checkpoint_failures_total', 'Checkpoints that failed', this.checkpointFailures, 'counter'),
      one('lockstep_pair_hidden_copied_bytes_total', "Bytes the secondary copied into its hidden disk (the old content of regions the primary's writes overwrite)", this.hiddenCopiedBytes, 'counter'),
      one('lockstep_pair_device_written_bytes_total', "Bytes clients wrote to the primary's served disk (as drbd_device_written_bytes_total)", this.writtenBytes, 'counter'),
      `${head('lockstep_pair_peerdevice_sent_bytes_total', 'Bytes of writes the primary replicated to the secondary (as drbd_peerdevice_sent_bytes_total)', 'counter')}\n` +
        `lockstep_pair_peerdevice_sent_bytes_total{peer="secondary",disk="disk"} ${this.sentBytes}`,
      `${head('lockstep_pair_peerdevice_received_bytes_total', 'Bytes of writes the secondary received from the primary (as drbd_peerdevice_received_bytes_total)', 'counter')}\n` +
        `lockstep_pair_peerdevice_received_bytes_total{peer="primary",disk="disk"} ${this.receivedBytes}`,
      one('lockstep_pair_hidden_dirty_clusters', 'Clusters copied into the hidden disk since the last checkpoint', this.hiddenCopiedClusters),
      `${head('lockstep_pair_heartbeat_age_seconds', "Age of the side's last answered heartbeat", 'gauge')}\nlockstep_pair_heartbeat_age_seconds{side="primary"} ${this.heartbeatAgeSeconds}`,
      `${head('lockstep_pair_heartbeats_late_total', 'Heartbeats answered or unanswered past the heartbeat timeout (a late side is not lost)', 'counter')}\n` +
        (['primary', 'secondary'] as const).map((s) => `lockstep_pair_heartbeats_late_total{side="${s}"} ${this.heartbeatsLate[s]}`).join('\n'),
      `${head('lockstep_pair_heartbeat_max_late_seconds', 'The longest a late heartbeat waited for its answer', 'gauge')}\n` +
        (['primary', 'secondary'] as const).map((s) => `lockstep_pair_heartbeat_max_late_seconds{side="${s}"} ${this.heartbeatMaxLateSeconds[s]}`).join('\n'),
      this.pause.render(),
      this.checkpointTime.render(),
    );
    return out.join('\n') + '\n';
  }
}
