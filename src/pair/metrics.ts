// The pair's figures: counters, gauges and two histograms (checkpoint pause, checkpoint
// duration), rendered in Prometheus' text exposition format. Hand-written rather than a
// dependency: a dozen series do not need a registry library.

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

export class PairMetrics {
  checkpoints = 0;
  checkpointFailures = 0;
  bytesForwarded = 0;
  dirtyClusters = 0;
  heartbeatAgeSeconds = 0;
  /** degraded: bytes changed on the primary since the last confirmed checkpoint */
  changedBytes = 0;
  /** heartbeats past the timeout, per side, and the longest wait for an answer */
  heartbeatsLate: { primary: number; secondary: number } = { primary: 0, secondary: 0 };
  heartbeatMaxLateSeconds: { primary: number; secondary: number } = { primary: 0, secondary: 0 };
  readonly pause = new Histogram('lockstep_pair_checkpoint_pause_seconds', 'Time guest writes were held for a checkpoint', PAUSE_BUCKETS);
  readonly checkpointTime = new Histogram('lockstep_pair_checkpoint_seconds', 'Time of the secondary checkpoint itself', PAUSE_BUCKETS);

  render(role: string, stage: string): string {
    const g = (name: string, help: string, v: number, type = 'gauge') => `# HELP ${name} ${help}\n# TYPE ${name} ${type}\n${name} ${v}`;
    return [
      `# HELP lockstep_pair_info The pair's role and stage\n# TYPE lockstep_pair_info gauge\nlockstep_pair_info{role="${role}",stage="${stage}"} 1`,
      g('lockstep_pair_checkpoints_total', 'Checkpoints taken', this.checkpoints, 'counter'),
      g('lockstep_pair_checkpoint_failures_total', 'Checkpoints that failed', this.checkpointFailures, 'counter'),
      g('lockstep_pair_bytes_forwarded_total', 'Bytes copied into the hidden disk on the secondary', this.bytesForwarded, 'counter'),
      g('lockstep_pair_dirty_clusters', 'Clusters copied since the last checkpoint', this.dirtyClusters),
      g('lockstep_pair_heartbeat_age_seconds', 'Age of the last answered heartbeat of the primary', this.heartbeatAgeSeconds),
      g('lockstep_pair_changed_bytes', 'Bytes the primary changed since the last checkpoint the secondary confirmed (degraded)', this.changedBytes),
      `# HELP lockstep_pair_heartbeats_late_total Heartbeats answered or unanswered past the heartbeat timeout (a late side is not lost)\n# TYPE lockstep_pair_heartbeats_late_total counter\n` +
        (['primary', 'secondary'] as const).map((s) => `lockstep_pair_heartbeats_late_total{side="${s}"} ${this.heartbeatsLate[s]}`).join('\n'),
      `# HELP lockstep_pair_heartbeat_max_late_seconds The longest a late heartbeat waited for its answer\n# TYPE lockstep_pair_heartbeat_max_late_seconds gauge\n` +
        (['primary', 'secondary'] as const).map((s) => `lockstep_pair_heartbeat_max_late_seconds{side="${s}"} ${this.heartbeatMaxLateSeconds[s]}`).join('\n'),
      this.pause.render(),
      this.checkpointTime.render(),
    ].join('\n') + '\n';
  }
}
