// Server transmission phase: parse requests, validate each one, run them concurrently on the
// export's Backend, and write every reply as one whole message through a single writer.
//
// Backpressure: at most `maxInFlight` requests (and about `maxInFlightBytes` of payload) per
// connection; the socket is paused at the cap and resumed below it. A reply counts as in
// flight until the socket has taken it (drain), so a slow reader also stops the intake.

import type { Duplex } from 'node:stream';
import type { Backend } from '../../block/backend.js';
import type { BlockStatus } from '../../block/driver.js';
import { BlockError, errorMessage } from '../../errors.js';
import { ByteQueue, RequestParser, encodeChunkHeader, encodeErrorPayload, encodeSimpleReply, writeChunkHeader, writeSimpleReply, writeU64, type NbdRequest } from '../codec.js';
import { nbdErrorOf } from '../errno.js';
import { CMD, CMD_FLAG, EXTENDED_REPLY_HEADER_LENGTH, MAX_PAYLOAD, NBD_ERR, REPLY_FLAG_DONE, REPLY_TYPE, SIMPLE_REPLY_LENGTH, STATE_HOLE, STATE_ZERO, STRUCTURED_REPLY_HEADER_LENGTH, commandName } from '../protocol.js';
import type { NbdExport } from './export.js';
import type { PayloadPool } from './payload-pool.js';
import { BASE_ALLOCATION_ID } from './handshake.js';
import { Quiesce } from '../../util/quiesce.js';
import { span } from '../../util/trace.js';
import { readIntoReusedBuffer } from './read-buffer.js';

export interface TransmissionOptions {
  structured: boolean;
  extended: boolean;
  baseAllocation: boolean;
  maxInFlight: number;
  maxInFlightBytes: number;
  /**
   * buffers for large write payloads, given back once their write succeeded, and for large
   * read replies, given back once the socket has taken them
   */
  payloadPool?: PayloadPool;
}

/** Holes and data runs of one read, at most this many chunks (the rest is sent as data). */
const MAX_READ_RUNS = 64;
/** Reply bytes queued in the socket beyond which a request waits for 'drain'. */
const MAX_BUFFERED_REPLY_BYTES = 4 * 1024 * 1024;
/** Extents per BLOCK_STATUS reply. */
const MAX_EXTENTS = 1024;
/**
 * Reads shorter than this are sent as one data chunk without asking for block status first:
 * a hole chunk saves little on a small read, and the status call (two lseeks for a file)
 * cost more than the bytes (the protocol lets a server send zeroes as data).
 */
const SPARSE_READ_MIN = 64 * 1024;
/**
 * Reply messages up to this size are gathered into one buffer per event-loop turn (one
 * socket write for all of them); larger ones are written as they are. Small reads are read
 * into reusable scratch buffers of this size and copied out when gathered.
 */
const SMALL_MESSAGE = 16 * 1024 + EXTENDED_REPLY_HEADER_LENGTH + 8;
/** scratch buffers kept for reuse per connection */
const MAX_SCRATCH = 64;
/**
 * With reads into a reused buffer, write payloads up to a quarter of this that arrive whole
 * are copied into slabs of this size (one external allocation per slab, not per request).
 */
const PAYLOAD_SLAB = 256 * 1024;

const VALID_FLAGS: Record<number, number> = {
  [CMD.READ]: CMD_FLAG.FUA | CMD_FLAG.DF,
  [CMD.WRITE]: CMD_FLAG.FUA,
  [CMD.DISC]: CMD_FLAG.FUA,
  [CMD.FLUSH]: CMD_FLAG.FUA,
  [CMD.TRIM]: CMD_FLAG.FUA,
  [CMD.CACHE]: CMD_FLAG.FUA,
  [CMD.WRITE_ZEROES]: CMD_FLAG.FUA | CMD_FLAG.NO_HOLE | CMD_FLAG.FAST_ZERO,
  [CMD.BLOCK_STATUS]: CMD_FLAG.FUA | CMD_FLAG.REQ_ONE,
};

class RequestFailure extends Error {
  constructor(
    readonly nbdError: number,
    message: string,
  ) {
    super(message);
  }
}

export class Transmission {
  private readonly parser: RequestParser;
  /** the requests in flight (the one quiesce primitive: a DISC or a shutdown drains it) */
  private readonly requests = new Quiesce();
  /** when the client last sent bytes or the last request finished (for the idle timeout) */
  lastActive = Date.now();
  private inFlightBytes = 0;
  private paused = false;
  private disconnecting = false;
  private closed = false;
  private readonly backend: Backend;
  /** replies waiting for the socket to drain (one 'drain' listener for all of them) */
  private readonly drainWaiters: Array<() => void> = [];
  private flushScheduled = false;
  /** small messages of this turn, sent as one buffer at its end (flushSmall) */
  private small: Buffer[] = [];
  private smallBytes = 0;
  /** scratch buffers among `small`, reusable once it has been copied out */
  private smallScratch: Buffer[] = [];
  private readonly scratch: Buffer[] = [];
  /** reads into one reused buffer: not yet tried, on, or not possible on this stream */
  private readBuffer: 'off' | 'on' | 'unavailable' = 'off';
  /** where small payloads copied out of the reused read buffer are carved from */
  private slab = Buffer.alloc(0);
  private slabUsed = 0;
  private readonly flushNow = (): void => {
    this.flushScheduled = false;
    this.flushSmall();
  };
  /** settles once the connection is closed and every request has finished */
  readonly done: Promise<void>;
  private resolveDone!: () => void;

  constructor(
    private readonly stream: Duplex,
    readonly exp: NbdExport,
    leftover: ByteQueue,
    private readonly opts: TransmissionOptions,
    private readonly log: (msg: string) => void,
  ) {
    this.backend = exp.backend;
    const pool = opts.payloadPool;
    this.parser = new RequestParser(opts.extended, leftover, pool ? (n) => pool.acquire(n) : undefined);
    this.done = new Promise((r) => (this.resolveDone = r));
    stream.on('data', (chunk: Buffer) => {
      this.lastActive = Date.now();
      this.parser.feed(chunk);
      this.pump();
      this.useReadBuffer();
    });
    stream.on('drain', () => this.wakeWriters());
    stream.on('error', () => this.close());
    stream.on('close', () => this.close());
    stream.on('end', () => this.close());
    this.useReadBuffer();
    stream.resume();
    this.pump();
  }

  /**
   * Reads into one reused buffer from now on (read-buffer.ts: no new buffer per socket read,
   * whose external memory started the daemons' major GCs). Only once the stream holds no
   * bytes read before, so that those are parsed first; the parser copies what it keeps of
   * each read (a partial header, a small payload) before the buffer is read into again.
   */
  private useReadBuffer(): void {
    if (this.readBuffer !== 'off' || this.closed || this.stream.readableLength > 0) return;
    const queue = this.parser.queue;
    const ok = readIntoReusedBuffer(this.stream, (bytes) => {
      this.lastActive = Date.now();
      this.parser.feed(bytes);
      this.pump();
      queue.retain(bytes);
    });
    this.readBuffer = ok ? 'on' : 'unavailable';
    if (ok) queue.copyOut = (n) => this.payloadCopy(n);
  }

  private payloadCopy(n: number): Buffer {
    if (n > PAYLOAD_SLAB / 4) return Buffer.allocUnsafe(n);
    if (this.slabUsed + n > this.slab.length) {
      this.slab = Buffer.allocUnsafeSlow(PAYLOAD_SLAB);
      this.slabUsed = 0;
    }
    const b = this.slab.subarray(this.slabUsed, this.slabUsed + n);
    this.slabUsed += (n + 7) & ~7;
    return b;
  }

  /** whether this connection reads into one reused buffer (read-buffer.ts) */
  get readsIntoReusedBuffer(): boolean {
    return this.readBuffer === 'on';
  }

  /** Ends the connection at once; requests in progress still finish (their replies are dropped). */
  abort(): void {
    this.close();
  }

  /** Stops taking requests, lets the in-flight ones reply, then closes (server shutdown). */
  async drainAndClose(): Promise<void> {
    this.disconnecting = true;
    this.stream.pause();
    await this.waitIdle();
    this.close(true);
  }

  private waitIdle(): Promise<void> {
    return this.requests.drain();
  }

  private wakeWriters(): void {
    for (const w of this.drainWaiters.splice(0)) w();
  }

  /** Closes the connection; `graceful` first flushes the replies still queued (DISC, shutdown). */
  private close(graceful = false): void {
    if (this.closed) return;
    this.closed = true;
    this.disconnecting = true;
    this.wakeWriters();
    if (graceful && !this.stream.destroyed) {
      this.flushSmall();
      this.stream.end(() => this.stream.destroy());
      setTimeout(() => this.stream.destroy(), 5000).unref();
    } else {
      this.stream.destroy();
    }
    void this.waitIdle().then(() => this.resolveDone());
  }

  private pump(): void {
    while (!this.disconnecting) {
      const inFlight = this.requests.inFlight;
      if (inFlight >= this.opts.maxInFlight || (inFlight > 0 && this.inFlightBytes >= this.opts.maxInFlightBytes)) {
        if (!this.paused) {
          this.paused = true;
          this.stream.pause();
        }
        return;
      }
      let req: NbdRequest | null;
      try {
        req = this.parser.next();
      } catch (e) {
        this.log(`dropping connection: ${errorMessage(e)}`);
        this.close();
        return;
      }
      if (!req) break;
      this.start(req);
    }
    if (this.paused && !this.disconnecting) {
      this.paused = false;
      this.stream.resume();
    }
  }

  private start(req: NbdRequest): void {
    if (req.type === CMD.DISC) {
      // Soft disconnect: the in-flight requests still get their replies.
      this.disconnecting = true;
      this.stream.pause();
      void this.waitIdle().then(() => this.close(true));
      return;
    }
    const bytes = req.type === CMD.READ && req.length !== null ? Math.min(req.length, MAX_PAYLOAD) : (req.data?.length ?? 0);
    this.requests.start();
    this.inFlightBytes += bytes;
    let p: Promise<void> | void;
    try {
      this.validate(req);
      p = this.execute(req);
    } catch (e) {
      p = this.failed(req, e);
    }
    if (p === undefined) {
      // replied already (a refused request): the pump loop that called us goes on
      this.finished(bytes, false);
      return;
    }
    p.then(
      () => this.finished(bytes),
      (e: unknown) => {
        // execute()'s own promise rejected: the reply for it is an error reply
        const r = this.failed(req, e);
        if (r) r.then(() => this.finished(bytes), (e2: unknown) => this.internal(req, e2, bytes));
        else this.finished(bytes);
      },
    );
  }

  private internal(req: NbdRequest, e: unknown, bytes: number): void {
    this.log(`internal error on ${commandName(req.type)}: ${errorMessage(e)}`);
    this.close();
    this.finished(bytes);
  }

  private failed(req: NbdRequest, e: unknown): Promise<void> | void {
    if (e instanceof RequestFailure) return this.sendError(req, e.nbdError, e.message);
    return this.sendError(req, nbdErrorOf(e), errorMessage(e));
  }

  /** a connection with requests in flight is never idle */
  get busy(): boolean {
    return this.requests.inFlight > 0;
  }

  private finished(bytes: number, pump = true): void {
    this.lastActive = Date.now();
    this.inFlightBytes -= bytes;
    this.requests.leave();
    if (pump && !this.closed) this.pump();
  }

  // ---- the single writer ----------------------------------------------------------------

  /**
   * Writes one whole message: its parts go out together in one writev, so messages never
   * interleave. Small messages are gathered and leave as one buffer at the end of the
   * event-loop turn (flushing earlier, at 8 or 16 waiting, measured slower for 4 KiB reads at
   * depth 32). The request's slot is held (a promise is returned) while more than
   * MAX_BUFFERED_REPLY_BYTES wait in the socket.
   */
  private send(parts: Buffer[], written?: () => void): Promise<void> | void {
    if (this.closed) return;
    if (parts.length === 1) return this.sendOne(parts[0]!, false, written);
    this.flushSmall();
    const s = this.stream;
    s.cork();
    let ok = true;
    for (let i = 0; i < parts.length; i++) ok = s.write(parts[i]!, i === parts.length - 1 ? written : undefined);
    s.uncork();
    if (!ok) return this.backpressure();
  }

  /**
   * send([msg]); `scratch`: msg is a scratch buffer, reused once it has been copied out;
   * `written` runs once the socket is done with msg (written or failed: a pooled buffer
   * goes back then; not called when the connection is closed already, the GC takes it)
   */
  private sendOne(msg: Buffer, scratch: boolean, written?: () => void): Promise<void> | void {
    if (this.closed) return;
    if (msg.length <= SMALL_MESSAGE && !written) {
      this.small.push(msg);
      this.smallBytes += msg.length;
      if (scratch) this.smallScratch.push(msg);
      if (this.smallBytes + this.stream.writableLength >= MAX_BUFFERED_REPLY_BYTES) {
        this.flushSmall();
        return this.backpressure();
      }
      if (!this.flushScheduled) {
        this.flushScheduled = true;
        setImmediate(this.flushNow);
      }
      return;
    }
    this.flushSmall();
    if (!this.stream.write(msg, written)) return this.backpressure();
  }

  /** Writes the gathered small messages as one buffer, in the order they came. */
  private flushSmall(): void {
    const n = this.small.length;
    if (n === 0) return;
    const out = n === 1 && this.smallScratch.length === 0 ? this.small[0]! : Buffer.concat(this.small, this.smallBytes);
    this.small = [];
    this.smallBytes = 0;
    // every scratch buffer is a view at the start of its own SMALL_MESSAGE-byte slab
    for (const b of this.smallScratch) if (this.scratch.length < MAX_SCRATCH) this.scratch.push(Buffer.from(b.buffer, 0, SMALL_MESSAGE));
    this.smallScratch = [];
    // a graceful close flushes what is gathered (closed is already set then)
    if (!this.stream.destroyed && !this.stream.writableEnded) this.stream.write(out);
  }

  private backpressure(): Promise<void> | void {
    if (this.stream.writableLength < MAX_BUFFERED_REPLY_BYTES || this.closed) return;
    return new Promise<void>((r) => this.drainWaiters.push(r));
  }

  private sendOk(req: NbdRequest): Promise<void> | void {
    if (this.opts.extended) {
      return this.send([encodeChunkHeader(REPLY_FLAG_DONE, REPLY_TYPE.NONE, req.cookie, 0, true, req.offset ?? 0)]);
    }
    const b = Buffer.allocUnsafe(SIMPLE_REPLY_LENGTH);
    writeSimpleReply(b, 0, 0, req.cookie);
    return this.sendOne(b, false);
  }

  private sendError(req: NbdRequest, error: number, message: string): Promise<void> | void {
    if (this.opts.structured) {
      const payload = encodeErrorPayload(error, message);
      return this.send([
        Buffer.concat([encodeChunkHeader(REPLY_FLAG_DONE, REPLY_TYPE.ERROR, req.cookie, payload.length, this.opts.extended, req.offset ?? 0), payload]),
      ]);
    }
    return this.send([encodeSimpleReply(error, req.cookie)]);
  }

  // ---- requests -------------------------------------------------------------------------

  private validate(req: NbdRequest): void {
    const valid = VALID_FLAGS[req.type];
    if (valid === undefined) throw new RequestFailure(NBD_ERR.EINVAL, `unknown command ${req.type}`);
    if (req.flags & ~valid) throw new RequestFailure(NBD_ERR.EINVAL, `invalid flags 0x${req.flags.toString(16)} for ${commandName(req.type)}`);
    if ((req.flags & CMD_FLAG.DF) && !this.opts.structured) throw new RequestFailure(NBD_ERR.EINVAL, 'NBD_CMD_FLAG_DF needs structured replies');
    if (req.type === CMD.FLUSH) {
      if (req.offset !== 0 || req.length !== 0) throw new RequestFailure(NBD_ERR.EINVAL, 'NBD_CMD_FLUSH with an offset or length');
      return;
    }
    if (req.offset === null || req.length === null) throw new RequestFailure(NBD_ERR.EINVAL, 'offset or length out of range');
    const size = this.exp.size;
    if (req.offset > size || req.length > size - req.offset) {
      throw new RequestFailure(NBD_ERR.EINVAL, `request [${req.offset}, +${req.length}) past the end of the export (${size} bytes)`);
    }
    if (req.type === CMD.READ && req.length > MAX_PAYLOAD) {
      throw new RequestFailure(NBD_ERR.EINVAL, `read of ${req.length} bytes exceeds the maximum of ${MAX_PAYLOAD}`);
    }
    const writes = req.type === CMD.WRITE || req.type === CMD.TRIM || req.type === CMD.WRITE_ZEROES;
    if (writes && !this.exp.writable) throw new RequestFailure(NBD_ERR.EPERM, 'export is read-only');
    if (req.type === CMD.BLOCK_STATUS) {
      if (!this.opts.baseAllocation) throw new RequestFailure(NBD_ERR.EINVAL, 'no metadata context was negotiated');
      if (req.length === 0) throw new RequestFailure(NBD_ERR.EINVAL, 'NBD_CMD_BLOCK_STATUS of length 0');
    }
  }

  /** Runs a valid request; its promise settles once the reply is queued (void: already). */
  private execute(req: NbdRequest): Promise<void> | void {
    const offset = req.offset!;
    const length = req.length!;
    switch (req.type) {
      case CMD.READ:
        return this.read(req, offset, length);
      case CMD.WRITE:
        return span('nbd.write', offset, this.backend.write(offset, req.data!, { fua: (req.flags & CMD_FLAG.FUA) !== 0 })).then(
          () => {
            // Only a write that succeeded gives its payload back: every write path settles
            // after everything that reads the data (quorum waits for all children, split
            // writes for all pieces) and an NBD client forwarding it destroys its socket
            // before it fails a request, so nothing reads it any more. A failed write may
            // have left a reader behind (a piece still queued or in the thread pool): its
            // buffer goes to the GC.
            if (req.pooled) this.opts.payloadPool?.release(req.data!);
            return this.sendOk(req);
          },
          (e: unknown) => this.failed(req, e),
        );
      default:
        return this.executeOther(req, offset, length);
    }
  }

  private async executeOther(req: NbdRequest, offset: number, length: number): Promise<void> {
    const be = this.backend;
    const fua = (req.flags & CMD_FLAG.FUA) !== 0;
    switch (req.type) {
      case CMD.FLUSH:
        await be.flush();
        return this.sendOk(req);
      case CMD.TRIM:
        await be.discard(offset, length);
        if (fua) await be.flush();
        return this.sendOk(req);
      case CMD.WRITE_ZEROES:
        await be.writeZeroes(offset, length, {
          fua,
          mayUnmap: (req.flags & CMD_FLAG.NO_HOLE) === 0,
          noFallback: (req.flags & CMD_FLAG.FAST_ZERO) !== 0,
        });
        return this.sendOk(req);
      case CMD.CACHE:
        // Advisory; every node reads straight through, so there is nothing to prefetch into.
        return this.sendOk(req);
      case CMD.BLOCK_STATUS:
        return this.blockStatus(req, offset, length);
      default:
        throw new RequestFailure(NBD_ERR.EINVAL, `unknown command ${req.type}`);
    }
  }

  private read(req: NbdRequest, offset: number, length: number): Promise<void> | void {
    // Where the node reads into a buffer itself, each reply is one buffer, header first and
    // the data read straight into its place behind it (the socket keeps it until it is
    // sent, or a small one is copied out with the turn's other replies and reused);
    // otherwise the node's own buffer is sent behind the header, not copied.
    const into = this.backend.node.readsInto;
    const structured = this.opts.structured;
    if (!into) return this.readCopy(req, offset, length);
    if (structured && length >= SPARSE_READ_MIN && !(req.flags & CMD_FLAG.DF)) return this.readSparse(req, offset, length);
    const ext = this.opts.extended;
    const head = !structured ? SIMPLE_REPLY_LENGTH : (ext ? EXTENDED_REPLY_HEADER_LENGTH : STRUCTURED_REPLY_HEADER_LENGTH) + 8;
    const total = head + length;
    const small = total <= SMALL_MESSAGE;
    const msg = small ? (this.scratch.pop() ?? Buffer.allocUnsafeSlow(SMALL_MESSAGE)).subarray(0, total) : this.replyBuffer(total);
    return this.backend.readInto(offset, msg.subarray(head)).then(
      () => {
        if (!structured) writeSimpleReply(msg, 0, 0, req.cookie);
        else {
          const h = writeChunkHeader(msg, 0, REPLY_FLAG_DONE, REPLY_TYPE.OFFSET_DATA, req.cookie, 8 + length, ext, offset);
          writeU64(msg, h, offset);
        }
        return small ? this.sendOne(msg, true) : this.sendOne(msg, false, this.releaser([msg]));
      },
      // a failed read's buffer is left to the GC (a reader below may still hold it)
      (e: unknown) => this.failed(req, e),
    );
  }

  /** A read from a node that returns its own buffers (sent behind the header, not copied). */
  private async readCopy(req: NbdRequest, offset: number, length: number): Promise<void> {
    try {
      if (!this.opts.structured) {
        const data = await this.backend.read(offset, length);
        return await this.send([encodeSimpleReply(0, req.cookie), data]);
      }
      const runs = length >= SPARSE_READ_MIN && !(req.flags & CMD_FLAG.DF) ? await this.readRuns(offset, length) : [{ offset, length, zero: false }];
      return await this.sendRuns(req, offset, runs, false);
    } catch (e) {
      return this.failed(req, e);
    }
  }

  /** A large read split into hole and data chunks by the node's block status. */
  private async readSparse(req: NbdRequest, offset: number, length: number): Promise<void> {
    try {
      return await this.sendRuns(req, offset, await this.readRuns(offset, length), true);
    } catch (e) {
      return this.failed(req, e);
    }
  }

  /**
   * A buffer for a large read reply: from the payload pool, whose buffers' pages are already
   * mapped (a fresh 256 KiB buffer per reply cost its page faults in the reading thread and
   * GC work for its external memory); given back by releaser() once the socket took it.
   */
  private replyBuffer(n: number): Buffer {
    return this.opts.payloadPool?.acquire(n) ?? Buffer.allocUnsafeSlow(n);
  }

  private releaser(bufs: Buffer[]): (() => void) | undefined {
    const pool = this.opts.payloadPool;
    if (!pool || bufs.length === 0) return undefined;
    return () => {
      for (const b of bufs) pool.release(b);
    };
  }

  private async sendRuns(req: NbdRequest, offset: number, runs: Array<{ offset: number; length: number; zero: boolean }>, into: boolean): Promise<void> {
    const ext = this.opts.extended;
    const chunks: Buffer[] = [];
    const pooled: Buffer[] = [];
    for (let i = 0; i < runs.length; i++) {
      const r = runs[i]!;
      const flags = i === runs.length - 1 ? REPLY_FLAG_DONE : 0;
      if (r.zero) {
        const p = Buffer.allocUnsafe(12);
        writeU64(p, 0, r.offset);
        p.writeUInt32BE(r.length, 8);
        chunks.push(encodeChunkHeader(flags, REPLY_TYPE.OFFSET_HOLE, req.cookie, 12, ext, offset), p);
      } else {
        const head = encodeChunkHeader(flags, REPLY_TYPE.OFFSET_DATA, req.cookie, 8 + r.length, ext, offset);
        if (into) {
          const msg = this.replyBuffer(head.length + 8 + r.length);
          // a failed read leaves its buffer (and those before it) to the GC
          await this.backend.readInto(r.offset, msg.subarray(head.length + 8));
          pooled.push(msg);
          head.copy(msg);
          writeU64(msg, head.length, r.offset);
          chunks.push(msg);
        } else {
          const data = await this.backend.read(r.offset, r.length);
          const p = Buffer.allocUnsafe(8);
          writeU64(p, 0, r.offset);
          chunks.push(head, p, data);
        }
      }
    }
    // All chunks are known to succeed before the first is sent (DONE only on the last).
    return this.send(chunks, this.releaser(pooled));
  }

  /** Splits a read into zero runs (sent as holes) and data runs, from the node's block status. */
  private async readRuns(offset: number, length: number): Promise<Array<{ offset: number; length: number; zero: boolean }>> {
    const runs: Array<{ offset: number; length: number; zero: boolean }> = [];
    const end = offset + length;
    let pos = offset;
    try {
      while (pos < end && runs.length < MAX_READ_RUNS - 1) {
        const s = await this.backend.blockStatus(pos, end - pos);
        const n = Math.min(s.length, end - pos);
        const last = runs[runs.length - 1];
        if (last && last.zero === s.zero) last.length += n;
        else runs.push({ offset: pos, length: n, zero: s.zero });
        pos += n;
      }
    } catch {
      return [{ offset, length, zero: false }];
    }
    if (pos < end) {
      const last = runs[runs.length - 1]!;
      if (!last.zero) last.length += end - pos;
      else runs.push({ offset: pos, length: end - pos, zero: false });
    }
    return runs;
  }

  private async blockStatus(req: NbdRequest, offset: number, length: number): Promise<void> {
    const extents: Array<{ length: number; flags: number }> = [];
    const end = offset + length;
    const one = (req.flags & CMD_FLAG.REQ_ONE) !== 0;
    let pos = offset;
    while (pos < end && extents.length < MAX_EXTENTS) {
      const s: BlockStatus = await this.backend.blockStatus(pos, end - pos);
      const n = Math.min(s.length, end - pos);
      if (n <= 0) throw new BlockError('EIO', 'block status made no progress');
      const flags = (s.data ? 0 : STATE_HOLE) | (s.zero ? STATE_ZERO : 0);
      const last = extents[extents.length - 1];
      if (last && last.flags === flags) last.length += n;
      else {
        if (one && last) break;
        extents.push({ length: n, flags });
      }
      pos += n;
    }
    const ext = this.opts.extended;
    let payload: Buffer;
    if (ext) {
      payload = Buffer.allocUnsafe(8 + 16 * extents.length);
      payload.writeUInt32BE(BASE_ALLOCATION_ID, 0);
      payload.writeUInt32BE(extents.length, 4);
      extents.forEach((e, i) => {
        payload.writeBigUInt64BE(BigInt(e.length), 8 + 16 * i);
        payload.writeBigUInt64BE(BigInt(e.flags), 16 + 16 * i);
      });
    } else {
      payload = Buffer.allocUnsafe(4 + 8 * extents.length);
      payload.writeUInt32BE(BASE_ALLOCATION_ID, 0);
      extents.forEach((e, i) => {
        payload.writeUInt32BE(e.length, 4 + 8 * i);
        payload.writeUInt32BE(e.flags, 8 + 8 * i);
      });
    }
    const type = ext ? REPLY_TYPE.BLOCK_STATUS_EXT : REPLY_TYPE.BLOCK_STATUS;
    return this.send([encodeChunkHeader(REPLY_FLAG_DONE, type, req.cookie, payload.length, ext, offset), payload]);
  }
}

