// Helpers of the hostile-input suite: file digests, a process's memory, lockstep commands
// whose peak RSS is reported by the process itself, raw QMP and NBD conversations.
import { createHash } from 'node:crypto';
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { resolve } from 'node:path';
import { LOCKSTEP_BIN } from '../helpers/daemon.js';
import { ByteQueue, OptionReplyParser, ReplyParser, encodeInfoRequest, encodeOptionRequest, type NbdReply } from '../../src/nbd/codec.js';
import { FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, OPT, REP } from '../../src/nbd/protocol.js';

export const sha256 = (path: string): string => createHash('sha256').update(readFileSync(path)).digest('hex');

/** VmRSS and VmHWM (peak) of a live process, in bytes (Linux /proc). */
export function memoryOf(pid: number): { rss: number; peak: number } {
  const s = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kib = (k: string): number => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm').exec(s)?.[1] ?? NaN) * 1024;
  return { rss: kib('VmRSS'), peak: kib('VmHWM') };
}

/** The preload that makes a lockstep process report its own peak RSS (peak-rss.ts). */
const PEAK_PRELOAD = resolve('dist/test/fuzz/peak-rss.js');

export interface CliRun {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** the process's peak RSS in bytes (getrusage maxrss), NaN when it did not exit by itself */
  peakRss: number;
}

/**
 * Runs `lockstep ARGS`; a run still going after `killAfterMs` is killed (and reported with
 * its signal), so that a hang shows as a failed case instead of a stuck suite.
 */
export function lockstep(args: string[], killAfterMs = 60_000): Promise<CliRun> {
  return new Promise((done) => {
    const p = spawn(process.execPath, ['--import', PEAK_PRELOAD, LOCKSTEP_BIN, ...args], { stdio: ['ignore', 'pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    let peak = '';
    p.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    p.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    (p.stdio[3] as NodeJS.ReadableStream).setEncoding('utf8');
    (p.stdio[3] as NodeJS.ReadableStream).on('data', (d: string) => (peak += d));
    const timer = setTimeout(() => p.kill('SIGKILL'), killAfterMs);
    p.on('close', (code, signal) => {
      clearTimeout(timer);
      done({ code, signal, stdout, stderr, peakRss: peak === '' ? NaN : Number(peak) });
    });
  });
}

/** Text that only a crash prints: a stack frame, a JS runtime error, an unhandled rejection. */
export const CRASH_TEXT = /\n\s+at |TypeError|RangeError|ReferenceError|SyntaxError|Unhandled|Maximum call stack|heap out of memory|\bundefined\b|\bNaN\b|\[object Object\]/;

/** A QMP connection at the byte level: what is written goes out as is; replies by line. */
export class RawQmp {
  private buf = '';
  private readonly lines: string[] = [];
  private wake: (() => void) | null = null;
  closed = false;

  private constructor(readonly socket: Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (d: string) => {
      this.buf += d;
      let nl: number;
      while ((nl = this.buf.indexOf('\n')) >= 0) {
        const line = this.buf.slice(0, nl).trim();
        this.buf = this.buf.slice(nl + 1);
        if (line !== '') this.lines.push(line);
      }
      this.wake?.();
    });
    socket.on('error', () => {});
    socket.on('close', () => {
      this.closed = true;
      this.wake?.();
    });
  }

  /** Connects, reads the greeting and negotiates capabilities. */
  static async open(path: string): Promise<RawQmp> {
    const socket = await new Promise<Socket>((res, rej) => {
      const s = connect(path, () => res(s));
      s.once('error', rej);
    });
    const q = new RawQmp(socket);
    const greeting = await q.next();
    if (!greeting || !('QMP' in greeting)) throw new Error(`no QMP greeting: ${JSON.stringify(greeting)}`);
    q.send('{"execute":"qmp_capabilities"}\n');
    const r = await q.next();
    if (!r || !('return' in r)) throw new Error(`qmp_capabilities failed: ${JSON.stringify(r)}`);
    return q;
  }

  send(text: string | Buffer): void {
    this.socket.write(text);
  }

  /** The next message (events skipped), or null once the connection closed. */
  async next(): Promise<Record<string, unknown> | null> {
    for (;;) {
      const line = this.lines.shift();
      if (line !== undefined) {
        const m = JSON.parse(line) as Record<string, unknown>;
        if ('event' in m) continue;
        return m;
      }
      if (this.closed) return null;
      await new Promise<void>((r) => (this.wake = r));
      this.wake = null;
    }
  }

  /** Messages up to and including the reply carrying `id` (null if the connection closed). */
  async until(id: string): Promise<Array<Record<string, unknown>> | null> {
    const out: Array<Record<string, unknown>> = [];
    for (;;) {
      const m = await this.next();
      if (m === null) return null;
      out.push(m);
      if (m.id === id) return out;
    }
  }

  close(): void {
    this.socket.destroy();
  }
}

/** A raw NBD connection: bytes in, replies out, and whether the server closed it. */
export class RawNbd {
  readonly queue = new ByteQueue();
  private wake: (() => void) | null = null;
  ended = false;

  private constructor(readonly socket: Socket) {
    socket.on('data', (c: Buffer) => {
      this.queue.push(c);
      this.wake?.();
    });
    socket.on('error', () => {});
    socket.on('close', () => {
      this.ended = true;
      this.wake?.();
    });
  }

  static async open(path: string): Promise<RawNbd> {
    const socket = await new Promise<Socket>((res, rej) => {
      const s = connect(path, () => res(s));
      s.once('error', rej);
    });
    return new RawNbd(socket);
  }

  async more(): Promise<void> {
    if (this.ended) return;
    await new Promise<void>((r) => (this.wake = r));
    this.wake = null;
  }

  /** Waits for `n` bytes (false if the server closed first). */
  async have(n: number): Promise<boolean> {
    while (this.queue.length < n) {
      if (this.ended) return false;
      await this.more();
    }
    return true;
  }

  async closedByServer(): Promise<void> {
    while (!this.ended) await this.more();
  }

  /** Reads the server's greeting and completes a fixed-newstyle handshake into `name`. */
  async handshake(name: string, structured = true): Promise<void> {
    if (!(await this.have(18))) throw new Error('no NBD greeting');
    this.queue.take(18);
    const parts: Buffer[] = [Buffer.from([0, 0, 0, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES])];
    if (structured) parts.push(encodeOptionRequest(OPT.STRUCTURED_REPLY));
    parts.push(encodeOptionRequest(OPT.GO, encodeInfoRequest(name, [])));
    this.socket.write(Buffer.concat(parts));
    const p = new OptionReplyParser(this.queue);
    for (;;) {
      const r = p.next();
      if (!r) {
        if (this.ended) throw new Error('closed during the handshake');
        await this.more();
        continue;
      }
      if (r.type & 0x80000000) throw new Error(`handshake refused: ${r.type}`);
      if (r.option === OPT.GO && r.type === REP.ACK) return;
    }
  }

  /** The next transmission reply, or null once the server closed the connection. */
  async reply(readLength?: number): Promise<NbdReply | null> {
    const rp = new ReplyParser(() => readLength, this.queue);
    for (;;) {
      const r = rp.next();
      if (r) return r;
      if (this.ended) return null;
      await this.more();
    }
  }

  destroy(): void {
    this.socket.destroy();
  }
}
