// Sequential reads from a socket during the handshakes (both sides), where each message is
// awaited in turn. The reader can be detached (STARTTLS swaps the stream underneath) and
// hands its queue to the transmission phase.

import type { Duplex } from 'node:stream';
import { ByteQueue, ProtocolError } from './codec.js';

export class StreamReader {
  readonly queue = new ByteQueue();
  private stream: Duplex | null = null;
  private wake: (() => void) | null = null;
  private ended: Error | null = null;
  private readonly onData = (chunk: Buffer): void => {
    this.queue.push(chunk);
    this.notify();
  };
  private readonly onEnd = (): void => {
    this.ended ??= new ProtocolError('connection closed by peer');
    this.notify();
  };
  private readonly onError = (e: Error): void => {
    this.ended ??= e;
    this.notify();
  };

  constructor(stream: Duplex) {
    this.attach(stream);
  }

  attach(stream: Duplex): void {
    this.stream = stream;
    this.ended = null;
    stream.on('data', this.onData);
    stream.on('end', this.onEnd);
    stream.on('close', this.onEnd);
    stream.on('error', this.onError);
    stream.resume();
  }

  /** Stops listening; the stream is left paused. */
  detach(): void {
    const s = this.stream;
    if (!s) return;
    s.pause();
    s.off('data', this.onData);
    s.off('end', this.onEnd);
    s.off('close', this.onEnd);
    s.off('error', this.onError);
    this.stream = null;
  }

  /** Fails the pending and later reads (timeouts, shutdown). */
  fail(e: Error): void {
    this.ended ??= e;
    this.notify();
  }

  private notify(): void {
    const w = this.wake;
    this.wake = null;
    w?.();
  }

  private async more(): Promise<void> {
    if (this.ended) throw this.ended;
    await new Promise<void>((r) => (this.wake = r));
  }

  async exact(n: number): Promise<Buffer> {
    while (this.queue.length < n) await this.more();
    return Buffer.from(this.queue.take(n));
  }

  /** Waits for the next whole message of a parser sharing this reader's queue. */
  async next<T>(parser: { next(): T | null }): Promise<T> {
    for (;;) {
      const m = parser.next();
      if (m !== null) return m;
      await this.more();
    }
  }
}
