// NBD message encoders and incremental parsers. Parsers keep the unconsumed tail in a
// ByteQueue and hand out whole messages only; every 64-bit field is read as a BigInt and
// converted with a check (offsets past 2^53 are reported, never rounded).
//
// Buffer ownership: buffers returned by a parser are either copies or views of chunks that
// node:net/node:tls allocate fresh for every 'data' event and never reuse, so a message's
// payload may be kept after the step that parsed it; except a request marked `pooled`,
// whose payload buffer its server takes back once the write has succeeded.

import {
  EXTENDED_REPLY_HEADER_LENGTH,
  EXTENDED_REPLY_MAGIC,
  EXTENDED_REQUEST_HEADER_LENGTH,
  EXTENDED_REQUEST_MAGIC,
  IHAVEOPT,
  MAX_OPTION_LENGTH,
  MAX_PAYLOAD,
  OPTION_REPLY_MAGIC,
  REQUEST_HEADER_LENGTH,
  REQUEST_MAGIC,
  SIMPLE_REPLY_LENGTH,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_HEADER_LENGTH,
  STRUCTURED_REPLY_MAGIC,
  CMD,
  CMD_FLAG,
} from './protocol.js';

/** A violation that ends the connection (bad magic, impossible length). */
export class ProtocolError extends Error {
  override name = 'ProtocolError';
}

/** The big-endian u64 at `at` as a JS number, or null when it does not fit in 2^53 (no BigInt). */
export function readU64(b: Buffer, at: number): number | null {
  const hi = b.readUInt32BE(at);
  return hi < 0x200000 ? hi * 0x100000000 + b.readUInt32BE(at + 4) : null;
}

/** A u64 as a JS number, or null when it does not fit in 2^53. */
export function u64ToNumber(v: bigint): number | null {
  return v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : null;
}

// ---- byte queue -------------------------------------------------------------------------

/** The unconsumed bytes of a stream, as a list of chunks (no copying until a take spans chunks). */
export class ByteQueue {
  private chunks: Buffer[] = [];
  private head = 0; // consumed bytes of chunks[0]
  length = 0;
  /**
   * Set when the chunks are views of a reused read buffer (server/read-buffer.ts): take()
   * then returns a buffer from here with a copy of the bytes, never a view of a chunk.
   */
  copyOut: ((n: number) => Buffer) | null = null;

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.length += chunk.length;
  }

  /** Copies `n` bytes from the front without consuming them (n is small: headers). */
  peek(n: number): Buffer {
    const out = Buffer.allocUnsafe(n);
    let copied = 0;
    let off = this.head;
    for (const c of this.chunks) {
      if (copied >= n) break;
      const k = Math.min(n - copied, c.length - off);
      c.copy(out, copied, off, off + k);
      copied += k;
      off = 0;
    }
    if (copied < n) throw new RangeError(`peek(${n}) with ${this.length} bytes queued`);
    return out;
  }

  /**
   * The first chunk when it holds the next `n` bytes whole (read them at `headOffset`), else
   * null: headers are read in place, without the copy peek() makes.
   */
  front(n: number): Buffer | null {
    const c = this.chunks[0];
    return c !== undefined && c.length - this.head >= n ? c : null;
  }

  get headOffset(): number {
    return this.head;
  }

  /** Drops `n` bytes from the front (n <= length). */
  skip(n: number): void {
    if (n > this.length) throw new RangeError(`skip(${n}) with ${this.length} bytes queued`);
    this.length -= n;
    while (n > 0) {
      const c = this.chunks[0]!;
      const k = Math.min(n, c.length - this.head);
      this.head += k;
      n -= k;
      if (this.head === c.length) {
        this.chunks.shift();
        this.head = 0;
      }
    }
  }

  take(n: number): Buffer {
    if (n > this.length) throw new RangeError(`take(${n}) with ${this.length} bytes queued`);
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0]!;
    if (this.copyOut) {
      const out = this.copyOut(n);
      this.takeInto(out, 0, n);
      return out;
    }
    if (first.length - this.head >= n) {
      const view = first.subarray(this.head, this.head + n);
      this.head += n;
      if (this.head === first.length) {
        this.chunks.shift();
        this.head = 0;
      }
      this.length -= n;
      return view;
    }
    const out = Buffer.allocUnsafe(n);
    this.takeInto(out, 0, n);
    return out;
  }

  /** Moves up to `max` bytes from the front into `dst` at `at`; how many it moved. */
  takeInto(dst: Buffer, at: number, max: number): number {
    let moved = 0;
    while (moved < max && this.chunks.length > 0) {
      const c = this.chunks[0]!;
      const k = Math.min(max - moved, c.length - this.head);
      c.copy(dst, at + moved, this.head, this.head + k);
      moved += k;
      this.head += k;
      if (this.head === c.length) {
        this.chunks.shift();
        this.head = 0;
      }
    }
    this.length -= moved;
    return moved;
  }

  /**
   * Replaces `chunk`, if still queued, by a copy of its bytes not yet consumed: it is a view of
   * a read buffer about to be overwritten (server/read-buffer.ts). Usually it was consumed
   * whole, or a partial header is left.
   */
  retain(chunk: Buffer): void {
    const i = this.chunks.lastIndexOf(chunk);
    if (i < 0) return;
    const from = i === 0 ? this.head : 0;
    this.chunks[i] = Buffer.from(chunk.subarray(from));
    if (i === 0) this.head = 0;
  }

  /** Everything still queued (handed over between handshake and transmission). */
  drain(): Buffer {
    return this.take(this.length);
  }
}

// ---- handshake ----------------------------------------------------------------------------

export interface OptionRequest {
  option: number;
  data: Buffer;
}

export function encodeOptionRequest(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(16 + data.length);
  b.writeBigUInt64BE(IHAVEOPT, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(data.length, 12);
  data.copy(b, 16);
  return b;
}

/** Server side: option requests. An option longer than MAX_OPTION_LENGTH is a ProtocolError. */
export class OptionRequestParser {
  constructor(readonly queue = new ByteQueue()) {}
  feed(chunk: Buffer): void {
    this.queue.push(chunk);
  }
  next(): OptionRequest | null {
    if (this.queue.length < 16) return null;
    const h = this.queue.peek(16);
    if (h.readBigUInt64BE(0) !== IHAVEOPT) throw new ProtocolError('bad option magic');
    const length = h.readUInt32BE(12);
    if (length > MAX_OPTION_LENGTH) throw new ProtocolError(`option data of ${length} bytes is too long`);
    if (this.queue.length < 16 + length) return null;
    this.queue.take(16);
    return { option: h.readUInt32BE(8), data: Buffer.from(this.queue.take(length)) };
  }
}

export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

export function encodeOptionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(20 + data.length);
  b.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(data.length, 16);
  data.copy(b, 20);
  return b;
}

export class OptionReplyParser {
  constructor(readonly queue = new ByteQueue()) {}
  feed(chunk: Buffer): void {
    this.queue.push(chunk);
  }
  next(): OptionReply | null {
    if (this.queue.length < 20) return null;
    const h = this.queue.peek(20);
    if (h.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) throw new ProtocolError('bad option reply magic');
    const length = h.readUInt32BE(16);
    if (length > MAX_OPTION_LENGTH) throw new ProtocolError(`option reply of ${length} bytes is too long`);
    if (this.queue.length < 20 + length) return null;
    this.queue.take(20);
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: Buffer.from(this.queue.take(length)) };
  }
}

/** Reads length-prefixed fields of option data, with a ProtocolError-free failure (null). */
export class FieldReader {
  pos = 0;
  constructor(readonly buf: Buffer) {}
  get remaining(): number {
    return this.buf.length - this.pos;
  }
  u16(): number | null {
    if (this.remaining < 2) return null;
    const v = this.buf.readUInt16BE(this.pos);
    this.pos += 2;
    return v;
  }
  u32(): number | null {
    if (this.remaining < 4) return null;
    const v = this.buf.readUInt32BE(this.pos);
    this.pos += 4;
    return v;
  }
  u64(): bigint | null {
    if (this.remaining < 8) return null;
    const v = this.buf.readBigUInt64BE(this.pos);
    this.pos += 8;
    return v;
  }
  bytes(n: number): Buffer | null {
    if (this.remaining < n) return null;
    const v = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    return v;
  }
  /** u32 length + UTF-8 string */
  string(): string | null {
    const n = this.u32();
    if (n === null) return null;
    const b = this.bytes(n);
    return b === null ? null : b.toString('utf8');
  }
}

/** Builds option payloads. */
export class FieldWriter {
  private parts: Buffer[] = [];
  u16(v: number): this {
    const b = Buffer.allocUnsafe(2);
    b.writeUInt16BE(v);
    this.parts.push(b);
    return this;
  }
  u32(v: number): this {
    const b = Buffer.allocUnsafe(4);
    b.writeUInt32BE(v >>> 0);
    this.parts.push(b);
    return this;
  }
  u64(v: number | bigint): this {
    const b = Buffer.allocUnsafe(8);
    b.writeBigUInt64BE(BigInt(v));
    this.parts.push(b);
    return this;
  }
  bytes(b: Buffer): this {
    this.parts.push(b);
    return this;
  }
  string(s: string): this {
    const b = Buffer.from(s, 'utf8');
    return this.u32(b.length).bytes(b);
  }
  /** string without a length prefix (when the length is implied by the message) */
  rest(s: string): this {
    return this.bytes(Buffer.from(s, 'utf8'));
  }
  build(): Buffer {
    return Buffer.concat(this.parts);
  }
}

/** NBD_OPT_INFO / NBD_OPT_GO data: export name and requested info types. */
export function decodeInfoRequest(data: Buffer): { name: string; requests: number[] } | null {
  const r = new FieldReader(data);
  const name = r.string();
  const n = r.u16();
  if (name === null || n === null || r.remaining !== n * 2) return null;
  const requests: number[] = [];
  for (let i = 0; i < n; i++) requests.push(r.u16()!);
  return { name, requests };
}

export function encodeInfoRequest(name: string, requests: number[]): Buffer {
  const w = new FieldWriter().string(name).u16(requests.length);
  for (const q of requests) w.u16(q);
  return w.build();
}

/** NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT data. */
export function decodeMetaContextRequest(data: Buffer): { name: string; queries: string[] } | null {
  const r = new FieldReader(data);
  const name = r.string();
  const n = r.u32();
  if (name === null || n === null || n > 1024) return null;
  const queries: string[] = [];
  for (let i = 0; i < n; i++) {
    const q = r.string();
    if (q === null) return null;
    queries.push(q);
  }
  if (r.remaining !== 0) return null;
  return { name, queries };
}

export function encodeMetaContextRequest(name: string, queries: string[]): Buffer {
  const w = new FieldWriter().string(name).u32(queries.length);
  for (const q of queries) w.string(q);
  return w.build();
}

// ---- transmission: requests ---------------------------------------------------------------

export interface NbdRequest {
  flags: number;
  type: number;
  cookie: bigint;
  /** byte offset; null when the wire value does not fit in 2^53 */
  offset: number | null;
  /** byte length (or payload length for writes); null when it does not fit in 2^53 */
  length: number | null;
  /** write payload (NBD_CMD_WRITE only) */
  data?: Buffer;
  /** `data` came from the parser's payload allocator (the server gives it back) */
  pooled?: boolean;
}

export function encodeRequest(
  req: { flags: number; type: number; cookie: bigint; offset: number; length: number },
  extended: boolean,
): Buffer {
  if (extended) {
    const b = Buffer.allocUnsafe(EXTENDED_REQUEST_HEADER_LENGTH);
    b.writeUInt32BE(EXTENDED_REQUEST_MAGIC, 0);
    b.writeUInt16BE(req.flags, 4);
    b.writeUInt16BE(req.type, 6);
    b.writeBigUInt64BE(req.cookie, 8);
    b.writeBigUInt64BE(BigInt(req.offset), 16);
    b.writeBigUInt64BE(BigInt(req.length), 24);
    return b;
  }
  const b = Buffer.allocUnsafe(REQUEST_HEADER_LENGTH);
  b.writeUInt32BE(REQUEST_MAGIC, 0);
  b.writeUInt16BE(req.flags, 4);
  b.writeUInt16BE(req.type, 6);
  b.writeBigUInt64BE(req.cookie, 8);
  b.writeBigUInt64BE(BigInt(req.offset), 16);
  b.writeUInt32BE(req.length, 24);
  return b;
}

/** True when the request carries a payload of `length` bytes after the header. */
function hasPayload(type: number, flags: number, extended: boolean): boolean {
  if (type === CMD.WRITE) return true;
  return extended && (flags & CMD_FLAG.PAYLOAD_LEN) !== 0;
}

/**
 * Server side: requests, with their write payload. A bad magic or a payload longer than
 * MAX_PAYLOAD cannot be skipped safely and is a ProtocolError (the connection is dropped).
 */
/**
 * A write payload at least this large that has not fully arrived is copied into its buffer
 * as its bytes arrive, so that no single turn of the event loop copies (and first touches)
 * all of a payload of up to MAX_PAYLOAD bytes (issue 14); smaller ones are taken whole.
 */
const ASSEMBLE_PAYLOAD_BYTES = 256 * 1024;

export class RequestParser {
  /** a request whose payload is still arriving, with the bytes of it copied so far */
  private partial: { req: NbdRequest; data: Buffer; filled: number } | null = null;

  constructor(
    public extended = false,
    readonly queue = new ByteQueue(),
    /** where an assembled payload's buffer comes from (a pool: the request is marked `pooled`) */
    private readonly allocPayload?: (n: number) => Buffer,
  ) {}
  feed(chunk: Buffer): void {
    this.queue.push(chunk);
  }
  next(): NbdRequest | null {
    const part = this.partial;
    if (part) {
      part.filled += this.queue.takeInto(part.data, part.filled, part.data.length - part.filled);
      if (part.filled < part.data.length) return null;
      this.partial = null;
      return part.req;
    }
    const hlen = this.extended ? EXTENDED_REQUEST_HEADER_LENGTH : REQUEST_HEADER_LENGTH;
    if (this.queue.length < hlen) return null;
    // in place when the header sits in one chunk (the usual case), else from a copy
    let h = this.queue.front(hlen);
    let at = this.queue.headOffset;
    if (h === null) {
      h = this.queue.peek(hlen);
      at = 0;
    }
    const magic = h.readUInt32BE(at);
    const want = this.extended ? EXTENDED_REQUEST_MAGIC : REQUEST_MAGIC;
    if (magic !== want) throw new ProtocolError(`bad request magic 0x${magic.toString(16)}`);
    const flags = h.readUInt16BE(at + 4);
    const type = h.readUInt16BE(at + 6);
    const cookie = h.readBigUInt64BE(at + 8);
    const offset = readU64(h, at + 16);
    const length = this.extended ? readU64(h, at + 24) : h.readUInt32BE(at + 24);
    let payload = 0;
    if (hasPayload(type, flags, this.extended)) {
      if (length === null || length > MAX_PAYLOAD) {
        throw new ProtocolError(`request payload of ${length ?? '>2^53'} bytes exceeds the maximum of ${MAX_PAYLOAD}`);
      }
      payload = length;
    }
    if (this.queue.length < hlen + payload && payload < ASSEMBLE_PAYLOAD_BYTES) return null;
    this.queue.skip(hlen);
    const req: NbdRequest = { flags, type, cookie, offset, length };
    if (this.queue.length < payload) {
      if (this.allocPayload) {
        req.data = this.allocPayload(payload);
        req.pooled = true;
      } else {
        req.data = Buffer.allocUnsafe(payload);
      }
      this.partial = { req, data: req.data, filled: 0 };
      return this.next();
    }
    if (payload > 0 || type === CMD.WRITE) req.data = this.queue.take(payload);
    return req;
  }
}

// ---- transmission: replies ---------------------------------------------------------------

/** Writes a simple reply header into `b` at `at` (SIMPLE_REPLY_LENGTH bytes). */
export function writeSimpleReply(b: Buffer, at: number, error: number, cookie: bigint): void {
  b.writeUInt32BE(SIMPLE_REPLY_MAGIC, at);
  b.writeUInt32BE(error, at + 4);
  b.writeBigUInt64BE(cookie, at + 8);
}

/** Writes a structured (or extended) chunk header into `b` at `at`; returns its length. */
export function writeChunkHeader(
  b: Buffer,
  at: number,
  flags: number,
  type: number,
  cookie: bigint,
  length: number,
  extended: boolean,
  offset = 0,
): number {
  b.writeUInt32BE(extended ? EXTENDED_REPLY_MAGIC : STRUCTURED_REPLY_MAGIC, at);
  b.writeUInt16BE(flags, at + 4);
  b.writeUInt16BE(type, at + 6);
  b.writeBigUInt64BE(cookie, at + 8);
  if (!extended) {
    b.writeUInt32BE(length, at + 16);
    return STRUCTURED_REPLY_HEADER_LENGTH;
  }
  writeU64(b, at + 16, offset);
  writeU64(b, at + 24, length);
  return EXTENDED_REPLY_HEADER_LENGTH;
}

/** Writes a safe integer as a big-endian u64 (no BigInt). */
export function writeU64(b: Buffer, at: number, v: number): void {
  const hi = Math.floor(v / 0x100000000);
  b.writeUInt32BE(hi, at);
  b.writeUInt32BE(v - hi * 0x100000000, at + 4);
}

export function encodeSimpleReply(error: number, cookie: bigint): Buffer {
  const b = Buffer.allocUnsafe(SIMPLE_REPLY_LENGTH);
  b.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  b.writeBigUInt64BE(cookie, 8);
  return b;
}

/** Header of a structured (or, with `extended`, extended) reply chunk of `length` payload bytes. */
export function encodeChunkHeader(
  flags: number,
  type: number,
  cookie: bigint,
  length: number,
  extended: boolean,
  offset = 0,
): Buffer {
  if (extended) {
    const b = Buffer.allocUnsafe(EXTENDED_REPLY_HEADER_LENGTH);
    b.writeUInt32BE(EXTENDED_REPLY_MAGIC, 0);
    b.writeUInt16BE(flags, 4);
    b.writeUInt16BE(type, 6);
    b.writeBigUInt64BE(cookie, 8);
    b.writeBigUInt64BE(BigInt(offset), 16);
    b.writeBigUInt64BE(BigInt(length), 24);
    return b;
  }
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_LENGTH);
  b.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(cookie, 8);
  b.writeUInt32BE(length, 16);
  return b;
}

export function encodeErrorPayload(error: number, message: string): Buffer {
  const msg = Buffer.from(message.slice(0, 1024), 'utf8');
  const b = Buffer.allocUnsafe(6 + msg.length);
  b.writeUInt32BE(error, 0);
  b.writeUInt16BE(msg.length, 4);
  msg.copy(b, 6);
  return b;
}

export type NbdReply =
  | { kind: 'simple'; cookie: bigint; error: number; data?: Buffer }
  | { kind: 'chunk'; cookie: bigint; flags: number; type: number; payload: Buffer };

/** Largest structured chunk payload accepted: read data plus its 8-byte offset, or extents. */
const MAX_CHUNK_PAYLOAD = MAX_PAYLOAD + 64 * 1024;

/**
 * Client side: simple, structured and extended replies. A simple reply to a read carries
 * the read's data, whose length only the client knows: `readLengthOf(cookie)` returns it for
 * in-flight simple-mode reads (and undefined otherwise).
 */
export class ReplyParser {
  constructor(
    private readonly readLengthOf: (cookie: bigint) => number | undefined = () => undefined,
    readonly queue = new ByteQueue(),
  ) {}
  feed(chunk: Buffer): void {
    this.queue.push(chunk);
  }
  next(): NbdReply | null {
    if (this.queue.length < 4) return null;
    const magic = this.queue.peek(4).readUInt32BE(0);
    if (magic === SIMPLE_REPLY_MAGIC) {
      if (this.queue.length < SIMPLE_REPLY_LENGTH) return null;
      const h = this.queue.peek(SIMPLE_REPLY_LENGTH);
      const error = h.readUInt32BE(4);
      const cookie = h.readBigUInt64BE(8);
      const dataLength = error === 0 ? (this.readLengthOf(cookie) ?? 0) : 0;
      if (this.queue.length < SIMPLE_REPLY_LENGTH + dataLength) return null;
      this.queue.take(SIMPLE_REPLY_LENGTH);
      const r: NbdReply = { kind: 'simple', cookie, error };
      if (dataLength > 0) r.data = this.queue.take(dataLength);
      return r;
    }
    if (magic === STRUCTURED_REPLY_MAGIC || magic === EXTENDED_REPLY_MAGIC) {
      const ext = magic === EXTENDED_REPLY_MAGIC;
      const hlen = ext ? EXTENDED_REPLY_HEADER_LENGTH : STRUCTURED_REPLY_HEADER_LENGTH;
      if (this.queue.length < hlen) return null;
      const h = this.queue.peek(hlen);
      const flags = h.readUInt16BE(4);
      const type = h.readUInt16BE(6);
      const cookie = h.readBigUInt64BE(8);
      const length = ext ? u64ToNumber(h.readBigUInt64BE(24)) : h.readUInt32BE(16);
      if (length === null || length > MAX_CHUNK_PAYLOAD) throw new ProtocolError(`reply chunk of ${length ?? '>2^53'} bytes is too long`);
      if (this.queue.length < hlen + length) return null;
      this.queue.take(hlen);
      return { kind: 'chunk', cookie, flags, type, payload: this.queue.take(length) };
    }
    throw new ProtocolError(`bad reply magic 0x${magic.toString(16)}`);
  }
}
