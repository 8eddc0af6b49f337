// Server side of the fixed newstyle handshake: option haggling up to NBD_OPT_GO /
// NBD_OPT_EXPORT_NAME. Oldstyle and non-fixed newstyle clients are refused (a client that
// does not set NBD_FLAG_C_FIXED_NEWSTYLE is dropped).
//
// With TLS required (FORCEDTLS in proto.md) every option but STARTTLS and ABORT is answered
// NBD_REP_ERR_TLS_REQD until the upgrade, and EXPORT_NAME drops the connection, so no export
// is reachable, nor even listed, in clear text.

import { TLSSocket, type SecureContext } from 'node:tls';
import type { Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import {
  FieldWriter,
  OptionRequestParser,
  ProtocolError,
  decodeInfoRequest,
  decodeMetaContextRequest,
  encodeOptionReply,
} from '../codec.js';
import {
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  INFO,
  IHAVEOPT,
  MAX_PAYLOAD,
  MAX_STRING,
  META_BASE_ALLOCATION,
  NBDMAGIC,
  OPT,
  REP,
} from '../protocol.js';
import type { StreamReader } from '../stream.js';
import type { NbdExport } from './export.js';

/** The context id of base:allocation (the only context we serve). */
export const BASE_ALLOCATION_ID = 1;
/** Options a client may send before it is dropped (a bound on a hostile handshake). */
const MAX_OPTIONS = 256;

export interface HandshakeHost {
  /** the export a client asked for ('' picks the only export when there is exactly one) */
  findExport(name: string): NbdExport | undefined;
  listExports(): NbdExport[];
  readonly tls: { context: SecureContext; verifyPeer: boolean } | null;
  readonly tlsRequired: boolean;
  readonly shuttingDown: boolean;
}

export interface Negotiated {
  exp: NbdExport;
  structured: boolean;
  extended: boolean;
  /** base:allocation was selected for this export */
  baseAllocation: boolean;
  /** the stream to use from now on (the TLS socket after STARTTLS) */
  stream: Duplex;
}

class Session {
  stream: Duplex;
  tlsUp = false;
  structured = false;
  extended = false;
  noZeroes = false;
  /** export name base:allocation was selected for, or null */
  metaFor: string | null = null;

  constructor(
    readonly socket: Socket,
    readonly reader: StreamReader,
    readonly host: HandshakeHost,
  ) {
    this.stream = socket;
  }

  send(buf: Buffer): void {
    this.stream.write(buf);
  }
  reply(option: number, type: number, data?: Buffer): void {
    this.send(encodeOptionReply(option, type, data));
  }
  error(option: number, type: number, message: string): void {
    this.reply(option, type, Buffer.from(message.slice(0, MAX_STRING), 'utf8'));
  }
}

/**
 * Runs the handshake. Resolves with the chosen export, or null when the client aborted or
 * was dropped for a protocol violation (the socket is then destroyed).
 */
export async function negotiate(socket: Socket, reader: StreamReader, host: HandshakeHost): Promise<Negotiated | null> {
  const s = new Session(socket, reader, host);
  const greeting = Buffer.allocUnsafe(18);
  greeting.writeBigUInt64BE(NBDMAGIC, 0);
  greeting.writeBigUInt64BE(IHAVEOPT, 8);
  greeting.writeUInt16BE(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 16);
  s.send(greeting);
  const clientFlags = (await reader.exact(4)).readUInt32BE(0);
  if ((clientFlags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)) !== 0 || !(clientFlags & FLAG_C_FIXED_NEWSTYLE)) {
    throw new ProtocolError(`unsupported client flags 0x${clientFlags.toString(16)}`);
  }
  s.noZeroes = (clientFlags & FLAG_C_NO_ZEROES) !== 0;
  const parser = new OptionRequestParser(reader.queue);
  for (let count = 0; count < MAX_OPTIONS; count++) {
    const { option, data } = await reader.next(parser);
    if (host.tlsRequired && !s.tlsUp && option !== OPT.STARTTLS && option !== OPT.ABORT) {
      if (option === OPT.EXPORT_NAME) throw new ProtocolError('NBD_OPT_EXPORT_NAME before the TLS upgrade');
      s.error(option, REP.ERR_TLS_REQD, 'TLS is required on this server: send NBD_OPT_STARTTLS first');
      continue;
    }
    if (host.shuttingDown && option !== OPT.ABORT) {
      if (option === OPT.EXPORT_NAME) throw new ProtocolError('server is shutting down');
      s.error(option, REP.ERR_SHUTDOWN, 'server is shutting down');
      continue;
    }
    const result = await handleOption(s, option, data);
    if (result === 'abort') return null;
    if (result) return result;
  }
  throw new ProtocolError(`more than ${MAX_OPTIONS} options`);
}

async function handleOption(s: Session, option: number, data: Buffer): Promise<Negotiated | 'abort' | void> {
  switch (option) {
    case OPT.EXPORT_NAME: {
      const name = data.toString('utf8');
      const exp = s.host.findExport(name);
      if (!exp) throw new ProtocolError(`unknown export '${name.slice(0, 256)}' in NBD_OPT_EXPORT_NAME`);
      const b = Buffer.alloc(s.noZeroes ? 10 : 134);
      b.writeBigUInt64BE(BigInt(exp.size), 0);
      b.writeUInt16BE(exp.flags(s.structured), 8);
      s.send(b);
      return finish(s, exp, name);
    }
    case OPT.ABORT:
      s.reply(option, REP.ACK);
      return 'abort';
    case OPT.LIST: {
      if (data.length !== 0) return s.error(option, REP.ERR_INVALID, 'NBD_OPT_LIST takes no data');
      for (const exp of s.host.listExports()) {
        s.reply(option, REP.SERVER, new FieldWriter().string(exp.name).rest(exp.description).build());
      }
      return s.reply(option, REP.ACK);
    }
    case OPT.STARTTLS: {
      if (data.length !== 0) return s.error(option, REP.ERR_INVALID, 'NBD_OPT_STARTTLS takes no data');
      if (s.tlsUp) return s.error(option, REP.ERR_INVALID, 'TLS is already active');
      const tls = s.host.tls;
      if (!tls) return s.error(option, REP.ERR_POLICY, 'TLS is not configured on this server');
      if (s.reader.queue.length !== 0) throw new ProtocolError('data sent after NBD_OPT_STARTTLS before its reply');
      s.reply(option, REP.ACK);
      s.reader.detach();
      const secure = new TLSSocket(s.socket, {
        isServer: true,
        secureContext: tls.context,
        requestCert: tls.verifyPeer,
        rejectUnauthorized: tls.verifyPeer,
      });
      await new Promise<void>((resolve, reject) => {
        secure.once('secure', resolve);
        secure.once('error', reject);
        secure.once('close', () => reject(new ProtocolError('connection closed during the TLS handshake')));
      });
      s.stream = secure;
      s.tlsUp = true;
      s.reader.attach(secure);
      return;
    }
    case OPT.STRUCTURED_REPLY:
      if (data.length !== 0) return s.error(option, REP.ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
      if (s.extended) return s.error(option, REP.ERR_INVALID, 'extended headers already imply structured replies');
      s.structured = true;
      return s.reply(option, REP.ACK);
    case OPT.EXTENDED_HEADERS:
      if (data.length !== 0) return s.error(option, REP.ERR_INVALID, 'NBD_OPT_EXTENDED_HEADERS takes no data');
      s.extended = true;
      s.structured = true;
      return s.reply(option, REP.ACK);
    case OPT.LIST_META_CONTEXT:
    case OPT.SET_META_CONTEXT:
      return metaContext(s, option, data);
    case OPT.INFO:
    case OPT.GO: {
      const req = decodeInfoRequest(data);
      if (!req) return s.error(option, REP.ERR_INVALID, 'malformed NBD_OPT_INFO/GO data');
      const exp = s.host.findExport(req.name);
      if (!exp) return s.error(option, REP.ERR_UNKNOWN, `export '${req.name.slice(0, 256)}' not present`);
      const infoExport = new FieldWriter().u16(INFO.EXPORT).u64(exp.size).u16(exp.flags(s.structured)).build();
      s.reply(option, REP.INFO, infoExport);
      if (req.requests.includes(INFO.NAME)) s.reply(option, REP.INFO, new FieldWriter().u16(INFO.NAME).rest(exp.name).build());
      if (req.requests.includes(INFO.DESCRIPTION) && exp.description) {
        s.reply(option, REP.INFO, new FieldWriter().u16(INFO.DESCRIPTION).rest(exp.description).build());
      }
      // Any alignment works (the block layer read-modify-writes); 4 KiB is the size we prefer.
      s.reply(option, REP.INFO, new FieldWriter().u16(INFO.BLOCK_SIZE).u32(1).u32(4096).u32(MAX_PAYLOAD).build());
      s.reply(option, REP.ACK);
      if (option === OPT.GO) return finish(s, exp, req.name);
      return;
    }
    default:
      return s.error(option, REP.ERR_UNSUP, `option ${option} is not supported`);
  }
}

function finish(s: Session, exp: NbdExport, requestedName: string): Negotiated {
  return {
    exp,
    structured: s.structured,
    extended: s.extended,
    baseAllocation: s.structured && s.metaFor !== null && s.metaFor === requestedName,
    stream: s.stream,
  };
}

function metaContext(s: Session, option: number, data: Buffer): void {
  const req = decodeMetaContextRequest(data);
  if (!req) return s.error(option, REP.ERR_INVALID, 'malformed meta context request');
  if (!s.structured) return s.error(option, REP.ERR_INVALID, 'meta contexts need structured replies first');
  if (!s.host.findExport(req.name)) return s.error(option, REP.ERR_UNKNOWN, `export '${req.name.slice(0, 256)}' not present`);
  const set = option === OPT.SET_META_CONTEXT;
  let match = false;
  if (!set && req.queries.length === 0) match = true;
  for (const q of req.queries) {
    if (q === META_BASE_ALLOCATION || (!set && q === 'base:')) match = true;
  }
  if (match) {
    s.reply(option, REP.META_CONTEXT, new FieldWriter().u32(set ? BASE_ALLOCATION_ID : 0).rest(META_BASE_ALLOCATION).build());
  }
  if (set) s.metaFor = match ? req.name : null;
  s.reply(option, REP.ACK);
}
