// One line that updates in place at the bottom of a terminal (sync, resync and commit
// progress, the pair's live status), with permanent lines (logs, messages) printed above it:
// a permanent line first erases the live one and the live one is drawn again after it, so the
// two never end up glued on one line. Off a terminal there is no live line at all.

const ERASE = '\r\x1b[K';

interface Out {
  write(s: string): boolean;
  isTTY?: boolean;
  columns?: number;
}

export class LiveLine {
  private current = '';

  constructor(
    /** the terminal the live line is drawn on (stderr, next to the logs) */
    private readonly tty: Out = process.stderr,
  ) {}

  /** a live line is drawn only on a terminal */
  get enabled(): boolean {
    return this.tty.isTTY === true;
  }

  /** Prints permanent text (whole lines) on `stream`, keeping the live line below it. */
  print(text: string, stream: Out = this.tty): void {
    if (this.current) this.tty.write(ERASE);
    stream.write(text);
    if (this.current) this.tty.write(this.current);
  }

  /** Replaces the live line (cut to the terminal's width: a wrapped line cannot be redrawn). */
  set(text: string): void {
    if (!this.enabled) return;
    const width = Math.max(20, (this.tty.columns ?? 80) - 1);
    this.current = text.length > width ? text.slice(0, width - 1) + '…' : text;
    this.tty.write(ERASE + this.current);
  }

  /** Removes the live line. */
  clear(): void {
    if (!this.current) return;
    this.tty.write(ERASE);
    this.current = '';
  }
}

/** "12.3 MiB" and the like, for progress and status lines. */
export function bytesText(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${n} B` : `${v.toFixed(1)} ${units[i]}`;
}

/** "42 s", "3 min 05 s", "1 h 02 min". */
export function durationText(seconds: number): string {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, '0')} s`;
  return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, '0')} min`;
}

/** A progress line in qemu-img's manner: "initial sync: 42.0% (430.1 MiB of 1.0 GiB), ETA 12 s". */
export function progressText(what: string, done: number, total: number, etaSeconds: number | null): string {
  const pct = total > 0 ? ((100 * done) / total).toFixed(1) : '100.0';
  return `${what}: ${pct}% (${bytesText(done)} of ${bytesText(total)})${etaSeconds !== null && Number.isFinite(etaSeconds) ? `, ETA ${durationText(etaSeconds)}` : ''}`;
}
