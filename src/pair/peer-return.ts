// After a failover across two hosts: waiting for the failed side's `lockstep pair host` to
// answer again, then re-protecting by itself (issue 13 item 4). The supervisor starts this in
// stage failed-over when the failed side is attached at a QMP address and re-protection is on;
// each attempt opens a QMP connection to that address (TLS as the pair's), asks one command
// and closes it. The first answer stops the watch and runs exactly what `lockstep pair
// reprotect` runs (onAnswer): the generations are compared there, so a returning disk that
// turns out newer, unrelated or split-brained is never copied over.
//
// Attempts back off (the first delay doubling up to 30 s, as a lost secondary's return) and
// the log stays quiet: one line when the wait begins, one when the reason of a failed attempt
// changes, one when the peer answers. `status()` says which side is awaited, since when, how
// many attempts were made and the last one's error.

import { QmpClient } from '../qmp/client.js';
import { errorMessage } from '../errors.js';
import { describeAddress, qmpOptions, type PairTls, type Side, type SideName } from './sides.js';
import { Backoff } from './reprotect.js';
import type { PairLog } from './core.js';
import type { StageMachine } from './stages.js';
import type { PairOptions } from './options.js';
import { otherSide } from './split-brain.js';
import type { SocketAddress } from '../util/socket-address.js';

export interface PeerReturnOptions {
  /** the failed side (the name its daemon was started as) and its QMP address */
  side: SideName;
  address: SocketAddress;
  tls: PairTls | undefined;
  /** the first delay between attempts, ms (doubles up to 30 s) */
  firstDelayMs: number;
  /** an attempt that gets no answer within this long fails */
  timeoutMs: number;
  log: PairLog;
  /** the peer answered: re-protect (the watch has stopped) */
  onAnswer: () => Promise<void>;
}

/** What `lockstep pair status` shows while the supervisor waits (field `waiting-for-peer`). */
export interface PeerWaitStatus {
  side: SideName;
  address: string;
  /** when the wait began (ISO time) */
  since: string;
  attempts: number;
  /** why the last attempt failed */
  'last-error'?: string;
  /** ms until the next attempt */
  'next-attempt-ms'?: number;
}

export class PeerReturnWatch {
  private readonly backoff: Backoff;
  private timer: NodeJS.Timeout | null = null;
  private nextAt = 0;
  private readonly since = new Date();
  private attempts = 0;
  private lastError: string | undefined;
  private stopped = false;

  constructor(private readonly o: PeerReturnOptions) {
    this.backoff = new Backoff(o.firstDelayMs);
  }

  start(): void {
    this.o.log('info', `waiting for the ${this.o.side} daemon at ${describeAddress(this.o.address)} to answer again: the pair re-protects by itself then (attempts back off up to 30 s)`);
    this.schedule();
  }

  stop(): void {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }

  status(): PeerWaitStatus {
    return {
      side: this.o.side,
      address: describeAddress(this.o.address),
      since: this.since.toISOString(),
      attempts: this.attempts,
      ...(this.lastError ? { 'last-error': this.lastError } : {}),
      ...(this.timer ? { 'next-attempt-ms': Math.max(0, this.nextAt - Date.now()) } : {}),
    };
  }

  private schedule(): void {
    if (this.stopped) return;
    const delay = this.backoff.next();
    this.nextAt = Date.now() + delay;
    this.timer = setTimeout(() => {
      this.timer = null;
      void this.attempt();
    }, delay);
  }

  private async attempt(): Promise<void> {
    if (this.stopped) return;
    this.attempts++;
    try {
      await probe(this.o.address, this.o.tls, this.o.timeoutMs);
    } catch (e) {
      const msg = errorMessage(e);
      // quiet: a line only when the reason changes, not at every attempt
      if (msg !== this.lastError) this.o.log('info', `the ${this.o.side} daemon does not answer yet: ${msg}`, { attempts: this.attempts });
      this.lastError = msg;
      this.schedule();
      return;
    }
    if (this.stopped) return;
    this.stop();
    const waited = Math.round((Date.now() - this.since.getTime()) / 1000);
    this.o.log('info', `the ${this.o.side} daemon answers again: re-protecting (as \`lockstep pair reprotect\`)`, { attempts: this.attempts, waitedSeconds: waited });
    await this.o.onAnswer().catch(() => {});
  }
}

/** What starting the watch reads and sets on the supervisor. */
export interface PeerWatchHost {
  readonly opts: PairOptions;
  readonly secondary: Side | null;
  readonly stages: StageMachine;
  readonly controlTimeoutMs: number;
  readonly returns: { peerWatch: PeerReturnWatch | null };
  reprotect(): Promise<void>;
}

/**
 * After a failover across two hosts (the failed side attached at a QMP address) with
 * re-protection on: wait for that side's daemon to answer, then re-protect as `lockstep
 * pair reprotect` does (peer-return.ts). On one host that command, or the next start, does it.
 */
export function watchPeerReturn(sup: PeerWatchHost): void {
  const o = sup.opts;
  const st = sup.returns;
  const survivor = sup.secondary;
  if (o.reprotect === false || !survivor || st.peerWatch) return;
  const failed = otherSide(survivor.name);
  const address = failed === 'primary' ? o.primaryQmp : o.secondaryQmp;
  if (!address) return;
  st.peerWatch = new PeerReturnWatch({
    side: failed,
    address,
    tls: o.tls,
    firstDelayMs: o.reprotectBackoffMs ?? 1000,
    timeoutMs: sup.controlTimeoutMs,
    log: o.log,
    onAnswer: async () => {
      st.peerWatch = null;
      if (sup.stages.stage !== 'failed-over') return;
      // a failed attempt logs and retries by itself once begun; one that could not begin
      // (the survivor gone) is said here
      await sup.reprotect().catch((e: unknown) => {
        if (sup.stages.stage === 'failed-over') o.log('error', `no re-protection: ${errorMessage(e)}`);
      });
    },
  });
  st.peerWatch.start();
}

/** One QMP round trip to `address`: connected, capabilities negotiated, one command answered. */
export async function probe(address: SocketAddress, tls: PairTls | undefined, timeoutMs: number): Promise<void> {
  const q = await QmpClient.open(address, { ...qmpOptions(tls, address), timeoutMs });
  let timer: NodeJS.Timeout | undefined;
  try {
    const silent = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`no answer within ${timeoutMs} ms`)), timeoutMs);
    });
    await Promise.race([q.execute('query-version'), silent]);
  } finally {
    clearTimeout(timer);
    q.close();
  }
}
