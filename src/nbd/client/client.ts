// NbdClient: one NBD connection, usable without a graph (tests, the pair supervisor) and
// wrapped by the `nbd` block driver.
//
//   const c = await NbdClient.connect({ address: { type: 'inet', host: '127.0.0.1', port: 10809 }, exportName: 'disk0' });
//   c.info;                                     // ExportDetails: size, flags, block sizes, modes
//   const buf = await c.read(0, 4096);          // many requests may be in flight (pipelined)
//   await c.write(0, buf, { fua: true });
//   await c.writeZeroes(0, 1 << 20, { noHole: false, fastZero: false });
//   await c.trim(0, 4096); await c.flush(); await c.cache(0, 4096);
//   const extents = await c.blockStatus(0, 1 << 20);   // [{ length, flags: STATE_HOLE | STATE_ZERO }]
//   await c.disconnect();
//   await NbdClient.list({ address });          // [{ name, description }]
//
// Failures of a request reject with BlockError (NBD errors mapped in nbd/errno.ts). A lost
// connection rejects every in-flight and later request with EIO; nothing waits forever.

import { connect as netConnect, type Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { BlockError, errorMessage } from '../../errors.js';
import { ReplyParser, encodeRequest, u64ToNumber, type NbdReply } from '../codec.js';
import { blockErrorOfNbd } from '../errno.js';
import { CMD, CMD_FLAG, REPLY_FLAG_DONE, REPLY_TYPE, TFLAG, commandName } from '../protocol.js';
import { StreamReader } from '../stream.js';
import type { TlsClientConfig } from '../tls.js';
import { clientList, clientNegotiate, type ExportDetails } from './handshake.js';
import { ACCEPTS_REQUESTS, checkTransition, type ClientState } from './states.js';
import type { SocketAddress } from '../../util/socket-address.js';


export interface NbdClientOptions {
  address: SocketAddress<number | string>;
  exportName?: string;
  tls?: TlsClientConfig;
  /** ask for structured replies (default true) */
  structuredReplies?: boolean;
  /** ask for extended headers (default false: few servers have them yet) */
  extendedHeaders?: boolean;
  /** ask for base:allocation (default true) */
  baseAllocation?: boolean;
  /** connect + handshake time limit (default 30 s) */
  connectTimeoutMs?: number;
  /** requests on the wire at once; more wait in a queue (default 64) */
  maxInFlight?: number;
  /** the connection counts as lost when requests are outstanding and no reply has come for
   *  this long (default: no limit). A cut link otherwise stalls every request for as long as
   *  TCP keeps retransmitting, which is many minutes. */
  ioTimeoutMs?: number;
}

export interface Extent {
  length: number;
  /** STATE_HOLE | STATE_ZERO */
  flags: number;
}

interface Pending {
  type: number;
  offset: number;
  length: number;
  resolve(v: unknown): void;
  reject(e: Error): void;
  data?: Buffer;
  extents?: Extent[];
  error?: BlockError;
}

function netError(e: unknown, addr: SocketAddress<number | string>): BlockError {
  const where = addr.type === 'unix' ? addr.path : `${addr.host}:${addr.port}`;
  if (e instanceof BlockError) return e;
  return new BlockError('EIO', `Failed to connect to '${where}': ${errorMessage(e)}`, { cause: e });
}

async function openSocket(addr: SocketAddress<number | string>, timeoutMs: number): Promise<Socket> {
  const socket =
    addr.type === 'unix'
      ? netConnect({ path: addr.path })
      : netConnect({ host: addr.host, port: typeof addr.port === 'string' ? Number(addr.port) : addr.port });
  socket.setNoDelay(true);
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error('connection timed out'));
    }, timeoutMs);
    socket.once('connect', () => {
      clearTimeout(timer);
      resolve();
    });
    socket.once('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
  });
  return socket;
}

async function withTimeout<T>(p: Promise<T>, ms: number, socket: Socket, reader: StreamReader): Promise<T> {
  const timer = setTimeout(() => {
    reader.fail(new Error('handshake timed out'));
    socket.destroy();
  }, ms);
  try {
    return await p;
  } finally {
    clearTimeout(timer);
  }
}

export class NbdClient {
  private state: ClientState = 'negotiating';
  private readonly pending = new Map<bigint, Pending>();
  private nextCookie = 1n;
  private readonly parser: ReplyParser;
  private readonly waiting: Array<() => void> = [];
  private readonly maxInFlight: number;
  private deadError: BlockError | null = null;
  /** when a reply last arrived, or the first request after an idle time was sent */
  private lastProgress = 0;
  private watchdog: NodeJS.Timeout | null = null;
  private readonly closedPromise: Promise<void>;
  private resolveClosed!: () => void;
  /** called once when the connection is lost (not on disconnect()) */
  onDead: ((e: BlockError) => void) | null = null;

  private constructor(
    private readonly stream: Duplex,
    readonly info: ExportDetails,
    reader: StreamReader,
    maxInFlight: number,
  ) {
    this.maxInFlight = maxInFlight;
    this.closedPromise = new Promise((r) => (this.resolveClosed = r));
    this.parser = new ReplyParser((cookie) => {
      const p = this.pending.get(cookie);
      return p && p.type === CMD.READ && !info.structuredReplies ? p.length : undefined;
    }, reader.queue);
    this.transition('ready');
    stream.on('data', (chunk: Buffer) => {
      this.parser.feed(chunk);
      this.drainReplies();
    });
    stream.on('error', (e) => this.die(new BlockError('EIO', `NBD connection error: ${e.message}`, { cause: e })));
    stream.on('close', () => this.die(new BlockError('EIO', 'NBD connection lost')));
    stream.on('end', () => this.die(new BlockError('EIO', 'NBD server closed the connection')));
    stream.resume();
    if (reader.queue.length > 0) this.drainReplies();
  }

  static async connect(o: NbdClientOptions): Promise<NbdClient> {
    const timeoutMs = o.connectTimeoutMs ?? 30_000;
    let socket: Socket;
    try {
      socket = await openSocket(o.address, timeoutMs);
    } catch (e) {
      throw netError(e, o.address);
    }
    const reader = new StreamReader(socket);
    try {
      const hs = {
        exportName: o.exportName ?? '',
        structuredReplies: o.structuredReplies ?? true,
        extendedHeaders: o.extendedHeaders ?? false,
        baseAllocation: o.baseAllocation ?? true,
        ...(o.tls ? { tls: o.tls } : {}),
        ...(o.address.type === 'inet' ? { host: o.address.host } : {}),
      };
      const { details, stream } = await withTimeout(clientNegotiate(socket, reader, hs), timeoutMs, socket, reader);
      reader.detach();
      const client = new NbdClient(stream, details, reader, o.maxInFlight ?? 64);
      if (o.ioTimeoutMs !== undefined && o.ioTimeoutMs > 0) client.watchReplies(o.ioTimeoutMs);
      return client;
    } catch (e) {
      socket.destroy();
      throw netError(e, o.address);
    }
  }

  /** Lists the server's exports (NBD_OPT_LIST). */
  static async list(o: { address: SocketAddress<number | string>; tls?: TlsClientConfig; connectTimeoutMs?: number }): Promise<Array<{ name: string; description: string }>> {
    const timeoutMs = o.connectTimeoutMs ?? 30_000;
    let socket: Socket;
    try {
      socket = await openSocket(o.address, timeoutMs);
    } catch (e) {
      throw netError(e, o.address);
    }
    const reader = new StreamReader(socket);
    try {
      const opts = { ...(o.tls ? { tls: o.tls } : {}), ...(o.address.type === 'inet' ? { host: o.address.host } : {}) };
      return await withTimeout(clientList(socket, reader, opts), timeoutMs, socket, reader);
    } catch (e) {
      throw netError(e, o.address);
    } finally {
      reader.detach();
      socket.end();
      setTimeout(() => socket.destroy(), 500).unref();
    }
  }

  get connectionState(): ClientState {
    return this.state;
  }
  get alive(): boolean {
    return ACCEPTS_REQUESTS[this.state];
  }
  get size(): number {
    return this.info.size;
  }
  get readOnly(): boolean {
    return (this.info.flags & TFLAG.READ_ONLY) !== 0;
  }
  has(flag: number): boolean {
    return (this.info.flags & flag) !== 0;
  }
  get inFlight(): number {
    return this.pending.size;
  }
  /** settles when the connection is gone (disconnected or lost) */
  get closed(): Promise<void> {
    return this.closedPromise;
  }

  private transition(to: ClientState): void {
    checkTransition(this.state, to);
    this.state = to;
  }

  /** Declares the connection lost when outstanding requests see no reply for `ms`. */
  private watchReplies(ms: number): void {
    this.watchdog = setInterval(() => {
      if (this.pending.size > 0 && Date.now() - this.lastProgress > ms) {
        this.die(new BlockError('EIO', `no reply from the NBD server for ${ms} ms`));
      }
    }, Math.max(10, Math.floor(ms / 4)));
    this.watchdog.unref();
  }

  private die(e: BlockError): void {
    if (this.watchdog) clearInterval(this.watchdog);
    this.watchdog = null;
    if (this.state === 'dead' || this.state === 'closed') return;
    const wasDisconnecting = this.state === 'disconnecting';
    this.transition(wasDisconnecting ? 'closed' : 'dead');
    this.deadError = e;
    this.stream.destroy();
    for (const p of this.pending.values()) p.reject(new BlockError('EIO', `${commandName(p.type)} failed: ${e.message}`, { cause: e }));
    this.pending.clear();
    for (const w of this.waiting.splice(0)) w();
    this.resolveClosed();
    if (!wasDisconnecting) this.onDead?.(e);
  }

  // ---- replies ------------------------------------------------------------------------------

  private drainReplies(): void {
    for (;;) {
      let r: NbdReply | null;
      try {
        r = this.parser.next();
      } catch (e) {
        this.die(new BlockError('EIO', `NBD protocol error: ${errorMessage(e)}`));
        return;
      }
      if (!r) return;
      try {
        this.handleReply(r);
      } catch (e) {
        this.die(new BlockError('EIO', `NBD protocol error: ${errorMessage(e)}`));
        return;
      }
    }
  }

  private complete(cookie: bigint, p: Pending, value?: unknown): void {
    this.pending.delete(cookie);
    if (this.watchdog) this.lastProgress = Date.now();
    if (p.error) p.reject(p.error);
    else p.resolve(value);
    this.waiting.shift()?.();
  }

  private handleReply(r: NbdReply): void {
    const p = this.pending.get(r.cookie);
    if (!p) throw new Error(`reply for unknown cookie ${r.cookie}`);
    if (r.kind === 'simple') {
      if (r.error !== 0) p.error = blockErrorOfNbd(r.error);
      return this.complete(r.cookie, p, p.type === CMD.READ ? (r.data ?? Buffer.alloc(0)) : undefined);
    }
    if (!this.info.structuredReplies) throw new Error('structured reply without negotiation');
    const done = (r.flags & REPLY_FLAG_DONE) !== 0;
    const pl = r.payload;
    switch (r.type) {
      case REPLY_TYPE.NONE:
        if (pl.length !== 0) throw new Error('NBD_REPLY_TYPE_NONE with a payload');
        break;
      case REPLY_TYPE.OFFSET_DATA: {
        if (p.type !== CMD.READ || pl.length < 8) throw new Error('unexpected OFFSET_DATA chunk');
        const off = u64ToNumber(pl.readBigUInt64BE(0));
        const n = pl.length - 8;
        if (off === null || off < p.offset || off + n > p.offset + p.length) throw new Error('OFFSET_DATA chunk outside the request');
        if (!p.data && done && off === p.offset && n === p.length) {
          p.data = pl.subarray(8); // the common case: one chunk with all the data
        } else {
          p.data ??= Buffer.alloc(p.length);
          pl.copy(p.data, off - p.offset, 8);
        }
        break;
      }
      case REPLY_TYPE.OFFSET_HOLE: {
        if (p.type !== CMD.READ || pl.length !== 12) throw new Error('unexpected OFFSET_HOLE chunk');
        const off = u64ToNumber(pl.readBigUInt64BE(0));
        const n = pl.readUInt32BE(8);
        if (off === null || off < p.offset || off + n > p.offset + p.length) throw new Error('OFFSET_HOLE chunk outside the request');
        p.data ??= Buffer.alloc(p.length); // zero-filled: holes need no copy
        break;
      }
      case REPLY_TYPE.BLOCK_STATUS:
      case REPLY_TYPE.BLOCK_STATUS_EXT: {
        if (p.type !== CMD.BLOCK_STATUS) throw new Error('unexpected block status chunk');
        const ext = r.type === REPLY_TYPE.BLOCK_STATUS_EXT;
        if (ext !== this.info.extendedHeaders) throw new Error('block status chunk of the wrong width');
        const id = pl.readUInt32BE(0);
        const extents: Extent[] = [];
        if (ext) {
          const count = pl.readUInt32BE(4);
          if (pl.length !== 8 + 16 * count || count === 0) throw new Error('malformed BLOCK_STATUS_EXT');
          for (let i = 0; i < count; i++) {
            const len = u64ToNumber(pl.readBigUInt64BE(8 + 16 * i));
            if (len === null) throw new Error('extent length past 2^53');
            extents.push({ length: len, flags: Number(pl.readBigUInt64BE(16 + 16 * i) & 0xffffffffn) });
          }
        } else {
          if (pl.length < 12 || (pl.length - 4) % 8 !== 0) throw new Error('malformed BLOCK_STATUS');
          for (let pos = 4; pos < pl.length; pos += 8) extents.push({ length: pl.readUInt32BE(pos), flags: pl.readUInt32BE(pos + 4) });
        }
        if (id === this.info.baseAllocationId) p.extents = extents;
        break;
      }
      case REPLY_TYPE.ERROR:
      case REPLY_TYPE.ERROR_OFFSET: {
        if (pl.length < 6) throw new Error('short error chunk');
        const err = pl.readUInt32BE(0);
        const mlen = pl.readUInt16BE(4);
        const msg = pl.subarray(6, 6 + mlen).toString('utf8');
        p.error ??= blockErrorOfNbd(err, msg);
        break;
      }
      default:
        if (r.type & 0x8000) {
          p.error ??= blockErrorOfNbd(pl.length >= 4 ? pl.readUInt32BE(0) : 0);
          break;
        }
        throw new Error(`unknown reply chunk type ${r.type}`);
    }
    if (!done) return;
    if (p.type === CMD.READ) return this.complete(r.cookie, p, p.data ?? Buffer.alloc(p.length));
    if (p.type === CMD.BLOCK_STATUS) {
      if (!p.error && !p.extents) p.error = new BlockError('EIO', 'NBD server sent no base:allocation extents');
      return this.complete(r.cookie, p, p.extents);
    }
    return this.complete(r.cookie, p);
  }

  // ---- requests -----------------------------------------------------------------------------

  private checkAlive(): void {
    if (!ACCEPTS_REQUESTS[this.state]) {
      throw this.deadError
        ? new BlockError('EIO', `NBD connection is down: ${this.deadError.message}`)
        : new BlockError('EIO', `NBD client is ${this.state}`);
    }
  }

  private async request<T>(type: number, flags: number, offset: number, length: number, data?: Buffer): Promise<T> {
    this.checkAlive();
    while (this.pending.size >= this.maxInFlight) {
      await new Promise<void>((r) => this.waiting.push(r));
      this.checkAlive();
    }
    const cookie = this.nextCookie++;
    const header = encodeRequest({ flags, type, cookie, offset, length }, this.info.extendedHeaders);
    return new Promise<T>((resolve, reject) => {
      if (this.watchdog && this.pending.size === 0) this.lastProgress = Date.now();
      this.pending.set(cookie, { type, offset, length, resolve: resolve as (v: unknown) => void, reject });
      if (data && data.length > 0) {
        this.stream.cork();
        this.stream.write(header);
        this.stream.write(data);
        this.stream.uncork();
      } else {
        this.stream.write(header);
      }
    });
  }

  private checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new BlockError('EINVAL', `invalid request: offset ${offset}, length ${length}`);
    }
    if (offset + length > this.info.size) {
      throw new BlockError('EINVAL', `request [${offset}, +${length}) past the end of the export (${this.info.size} bytes)`);
    }
  }

  /** Reads; requests larger than the server's maximum payload are split. */
  async read(offset: number, length: number): Promise<Buffer> {
    this.checkRange(offset, length);
    const max = this.info.maxPayload;
    if (length <= max) return this.request<Buffer>(CMD.READ, 0, offset, length);
    const parts: Promise<Buffer>[] = [];
    for (let pos = 0; pos < length; pos += max) parts.push(this.request<Buffer>(CMD.READ, 0, offset + pos, Math.min(max, length - pos)));
    return Buffer.concat(await Promise.all(parts));
  }

  /** Writes; `data` is not kept after the promise settles (it is copied into the socket). */
  async write(offset: number, data: Buffer, flags: { fua?: boolean } = {}): Promise<void> {
    this.checkRange(offset, data.length);
    const f = flags.fua ? CMD_FLAG.FUA : 0;
    const max = this.info.maxPayload;
    if (data.length <= max) return this.request<void>(CMD.WRITE, f, offset, data.length, data);
    const parts: Promise<void>[] = [];
    for (let pos = 0; pos < data.length; pos += max) {
      const d = data.subarray(pos, Math.min(data.length, pos + max));
      parts.push(this.request<void>(CMD.WRITE, f, offset + pos, d.length, d));
    }
    // Settles only when every piece has: a caller may reuse `data` once this fails.
    const results = await Promise.allSettled(parts);
    for (const r of results) if (r.status === 'rejected') throw r.reason;
  }

  async flush(): Promise<void> {
    return this.request<void>(CMD.FLUSH, 0, 0, 0);
  }

  /** Compact headers carry 32-bit lengths: longer trims/zeroes/statuses are split. */
  private maxLength(): number {
    return this.info.extendedHeaders ? Number.MAX_SAFE_INTEGER : 0x80000000;
  }

  async trim(offset: number, length: number, flags: { fua?: boolean } = {}): Promise<void> {
    this.checkRange(offset, length);
    const f = flags.fua ? CMD_FLAG.FUA : 0;
    const max = this.maxLength();
    const parts: Promise<void>[] = [];
    for (let pos = 0; pos < length || (length === 0 && pos === 0); pos += max) {
      parts.push(this.request<void>(CMD.TRIM, f, offset + pos, Math.min(max, length - pos)));
      if (length === 0) break;
    }
    await Promise.all(parts);
  }

  async writeZeroes(offset: number, length: number, flags: { fua?: boolean; noHole?: boolean; fastZero?: boolean } = {}): Promise<void> {
    this.checkRange(offset, length);
    const f = (flags.fua ? CMD_FLAG.FUA : 0) | (flags.noHole ? CMD_FLAG.NO_HOLE : 0) | (flags.fastZero ? CMD_FLAG.FAST_ZERO : 0);
    const max = this.maxLength();
    const parts: Promise<void>[] = [];
    for (let pos = 0; pos < length || (length === 0 && pos === 0); pos += max) {
      parts.push(this.request<void>(CMD.WRITE_ZEROES, f, offset + pos, Math.min(max, length - pos)));
      if (length === 0) break;
    }
    await Promise.all(parts);
  }

  async cache(offset: number, length: number): Promise<void> {
    this.checkRange(offset, length);
    return this.request<void>(CMD.CACHE, 0, offset, Math.min(length, this.maxLength()));
  }

  /** base:allocation extents from `offset` (the server may describe less than `length`). */
  async blockStatus(offset: number, length: number, flags: { reqOne?: boolean } = {}): Promise<Extent[]> {
    this.checkRange(offset, length);
    if (this.info.baseAllocationId === null) throw new BlockError('ENOTSUP', 'the server did not agree to base:allocation');
    return this.request<Extent[]>(CMD.BLOCK_STATUS, flags.reqOne ? CMD_FLAG.REQ_ONE : 0, offset, Math.min(length, this.maxLength() - 4096));
  }

  /** Raw request, for tests that need flags or commands the typed methods refuse. */
  async rawRequest(type: number, flags: number, offset: number, length: number, data?: Buffer): Promise<unknown> {
    return this.request<unknown>(type, flags, offset, length, data);
  }

  /** Soft disconnect: waits for in-flight requests, sends NBD_CMD_DISC, closes. */
  async disconnect(): Promise<void> {
    if (this.state !== 'ready') {
      this.stream.destroy();
      return;
    }
    const inflight = [...this.pending.values()].map(
      (p) =>
        new Promise<void>((r) => {
          const { resolve, reject } = p;
          p.resolve = (v) => (resolve(v), r());
          p.reject = (e) => (reject(e), r());
        }),
    );
    await Promise.all(inflight);
    if (this.state !== 'ready') return;
    this.transition('disconnecting');
    this.stream.write(encodeRequest({ flags: 0, type: CMD.DISC, cookie: this.nextCookie++, offset: 0, length: 0 }, this.info.extendedHeaders));
    this.stream.end();
    const timer = setTimeout(() => this.stream.destroy(), 2000);
    await this.closedPromise;
    clearTimeout(timer);
  }

  /** Hard close (no DISC). */
  destroy(): void {
    this.stream.destroy();
  }
}
