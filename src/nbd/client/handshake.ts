// Client side of the fixed newstyle handshake: STARTTLS when asked, extended headers or
// structured replies when offered, base:allocation, then NBD_OPT_GO (falling back to
// NBD_OPT_EXPORT_NAME for servers without GO).

import { connect as tlsConnect, type ConnectionOptions, type TLSSocket } from 'node:tls';
import type { Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { BlockError } from '../../errors.js';
import {
  FieldReader,
  OptionReplyParser,
  ProtocolError,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOptionRequest,
  type OptionReply,
} from '../codec.js';
import {
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  IHAVEOPT,
  INFO,
  MAX_PAYLOAD,
  META_BASE_ALLOCATION,
  NBDMAGIC,
  OPT,
  REP,
  REP_ERR_BIT,
  optionName,
} from '../protocol.js';
import type { StreamReader } from '../stream.js';
import type { TlsClientConfig } from '../tls.js';

export interface ExportDetails {
  name: string;
  description: string;
  size: number;
  /** transmission flags */
  flags: number;
  minBlockSize: number;
  preferredBlockSize: number;
  maxPayload: number;
  structuredReplies: boolean;
  extendedHeaders: boolean;
  /** context id of base:allocation, or null when not negotiated */
  baseAllocationId: number | null;
  tls: boolean;
}

export interface HandshakeOptions {
  exportName: string;
  tls?: TlsClientConfig;
  /** host name for certificate checks (inet) */
  host?: string;
  structuredReplies: boolean;
  extendedHeaders: boolean;
  baseAllocation: boolean;
}

class OptionChannel {
  stream: Duplex;
  readonly parser: OptionReplyParser;
  constructor(
    socket: Socket,
    readonly reader: StreamReader,
  ) {
    this.stream = socket;
    this.parser = new OptionReplyParser(reader.queue);
  }
  send(option: number, data?: Buffer): void {
    this.stream.write(encodeOptionRequest(option, data));
  }
  async reply(option: number): Promise<OptionReply> {
    const r = await this.reader.next(this.parser);
    if (r.option !== option) throw new ProtocolError(`reply to ${optionName(r.option)} while waiting for ${optionName(option)}`);
    return r;
  }
}

export function replyMessage(r: OptionReply): string {
  return r.data.length ? r.data.toString('utf8') : `error 0x${(r.type >>> 0).toString(16)}`;
}

/** Greeting and flags; returns the option channel. */
async function start(socket: Socket, reader: StreamReader): Promise<{ ch: OptionChannel; noZeroes: boolean }> {
  const g = await reader.exact(18);
  if (g.readBigUInt64BE(0) !== NBDMAGIC) throw new ProtocolError('not an NBD server (bad magic)');
  if (g.readBigUInt64BE(8) !== IHAVEOPT) throw new ProtocolError('server uses the oldstyle handshake, which is not supported');
  const flags = g.readUInt16BE(16);
  if (!(flags & FLAG_FIXED_NEWSTYLE)) throw new ProtocolError('server does not support fixed newstyle negotiation');
  const noZeroes = (flags & FLAG_NO_ZEROES) !== 0;
  const cf = Buffer.allocUnsafe(4);
  cf.writeUInt32BE(FLAG_C_FIXED_NEWSTYLE | (noZeroes ? FLAG_C_NO_ZEROES : 0));
  socket.write(cf);
  return { ch: new OptionChannel(socket, reader), noZeroes };
}

async function startTls(socket: Socket, ch: OptionChannel, cfg: TlsClientConfig, host: string | undefined): Promise<TLSSocket> {
  ch.send(OPT.STARTTLS);
  const r = await ch.reply(OPT.STARTTLS);
  if (r.type !== REP.ACK) throw new BlockError('EIO', `Server does not support STARTTLS: ${replyMessage(r)}`);
  ch.reader.detach();
  const verify = cfg.verifyPeer ?? true;
  const servername = cfg.hostname ?? host;
  const opts: ConnectionOptions = { socket, rejectUnauthorized: verify };
  if (cfg.ca !== undefined) opts.ca = cfg.ca;
  if (cfg.cert !== undefined) opts.cert = cfg.cert;
  if (cfg.key !== undefined) opts.key = cfg.key;
  if (servername !== undefined && !/^[\d.:]+$/.test(servername)) opts.servername = servername;
  // Without a host name to check (unix sockets), trust is the CA signature alone.
  if (servername === undefined) opts.checkServerIdentity = () => undefined;
  else if (/^[\d.:]+$/.test(servername)) opts.host = servername;
  const secure = tlsConnect(opts);
  await new Promise<void>((resolve, reject) => {
    secure.once('secureConnect', resolve);
    secure.once('error', (e) => reject(new BlockError('EIO', `TLS handshake failed: ${e.message}`, { cause: e })));
  });
  ch.stream = secure;
  ch.reader.attach(secure);
  return secure;
}

export async function clientNegotiate(socket: Socket, reader: StreamReader, o: HandshakeOptions): Promise<{ details: ExportDetails; stream: Duplex }> {
  const { ch, noZeroes } = await start(socket, reader);
  let tls = false;
  if (o.tls) {
    await startTls(socket, ch, o.tls, o.host);
    tls = true;
  }
  let structured = false;
  let extended = false;
  if (o.extendedHeaders) {
    ch.send(OPT.EXTENDED_HEADERS);
    const r = await ch.reply(OPT.EXTENDED_HEADERS);
    if (r.type === REP.ACK) extended = structured = true;
    else if (r.type === REP.ERR_TLS_REQD) throw new BlockError('EPERM', 'Server requires TLS');
  }
  if (!structured && o.structuredReplies) {
    ch.send(OPT.STRUCTURED_REPLY);
    const r = await ch.reply(OPT.STRUCTURED_REPLY);
    if (r.type === REP.ACK) structured = true;
    else if (r.type === REP.ERR_TLS_REQD) throw new BlockError('EPERM', 'Server requires TLS');
  }
  let baseAllocationId: number | null = null;
  if (structured && o.baseAllocation) {
    ch.send(OPT.SET_META_CONTEXT, encodeMetaContextRequest(o.exportName, [META_BASE_ALLOCATION]));
    for (;;) {
      const r = await ch.reply(OPT.SET_META_CONTEXT);
      if (r.type === REP.META_CONTEXT) {
        const f = new FieldReader(r.data);
        const id = f.u32();
        if (id !== null && f.bytes(f.remaining)!.toString('utf8') === META_BASE_ALLOCATION) baseAllocationId = id;
        continue;
      }
      if (r.type === REP.ERR_UNKNOWN) throw new BlockError('ENOENT', `Requested export not available: ${replyMessage(r)}`);
      break; // ACK, or an error: no block status
    }
  }
  const details: ExportDetails = {
    name: o.exportName,
    description: '',
    size: 0,
    flags: 0,
    minBlockSize: 1,
    preferredBlockSize: 4096,
    maxPayload: MAX_PAYLOAD,
    structuredReplies: structured,
    extendedHeaders: extended,
    baseAllocationId,
    tls,
  };
  ch.send(OPT.GO, encodeInfoRequest(o.exportName, [INFO.NAME, INFO.DESCRIPTION, INFO.BLOCK_SIZE]));
  let gotExport = false;
  for (;;) {
    const r = await ch.reply(OPT.GO);
    if (r.type === REP.INFO) {
      parseInfo(r.data, details) && (gotExport = true);
      continue;
    }
    if (r.type === REP.ACK) break;
    if (r.type === REP.ERR_UNSUP) {
      // An old server: NBD_OPT_EXPORT_NAME (which ends the haggling without an error reply).
      ch.send(OPT.EXPORT_NAME, Buffer.from(o.exportName, 'utf8'));
      const b = await reader.exact(noZeroes ? 10 : 134);
      details.size = checkedSize(b.readBigUInt64BE(0));
      details.flags = b.readUInt16BE(8);
      gotExport = true;
      break;
    }
    if (r.type === REP.ERR_TLS_REQD) throw new BlockError('EPERM', `Server requires TLS: ${replyMessage(r)}`);
    if (r.type === REP.ERR_UNKNOWN) throw new BlockError('ENOENT', `Requested export not available: ${replyMessage(r)}`);
    if (r.type & REP_ERR_BIT) throw new BlockError('EIO', `Server refused export '${o.exportName}': ${replyMessage(r)}`);
    throw new ProtocolError(`unexpected reply type ${r.type} to NBD_OPT_GO`);
  }
  if (!gotExport) throw new ProtocolError('server sent no NBD_INFO_EXPORT');
  return { details, stream: ch.stream };
}

function checkedSize(v: bigint): number {
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new ProtocolError('export size exceeds 2^53');
  return Number(v);
}

function parseInfo(data: Buffer, d: ExportDetails): boolean {
  const f = new FieldReader(data);
  const type = f.u16();
  switch (type) {
    case INFO.EXPORT: {
      const size = f.u64();
      const flags = f.u16();
      if (size === null || flags === null) throw new ProtocolError('short NBD_INFO_EXPORT');
      d.size = checkedSize(size);
      d.flags = flags;
      return true;
    }
    case INFO.NAME:
      d.name = f.bytes(f.remaining)!.toString('utf8');
      return false;
    case INFO.DESCRIPTION:
      d.description = f.bytes(f.remaining)!.toString('utf8');
      return false;
    case INFO.BLOCK_SIZE: {
      const min = f.u32();
      const pref = f.u32();
      const max = f.u32();
      if (min === null || pref === null || max === null) throw new ProtocolError('short NBD_INFO_BLOCK_SIZE');
      d.minBlockSize = min || 1;
      d.preferredBlockSize = pref || 4096;
      d.maxPayload = Math.min(max || MAX_PAYLOAD, MAX_PAYLOAD);
      return false;
    }
    default:
      return false; // unknown info types are ignored
  }
}

/** NBD_OPT_LIST after the greeting (and STARTTLS when configured), then NBD_OPT_ABORT. */
export async function clientList(socket: Socket, reader: StreamReader, o: { tls?: TlsClientConfig; host?: string }): Promise<Array<{ name: string; description: string }>> {
  const { ch } = await start(socket, reader);
  if (o.tls) await startTls(socket, ch, o.tls, o.host);
  ch.send(OPT.LIST);
  const out: Array<{ name: string; description: string }> = [];
  for (;;) {
    const r = await ch.reply(OPT.LIST);
    if (r.type === REP.SERVER) {
      const f = new FieldReader(r.data);
      const name = f.string();
      if (name === null) throw new ProtocolError('malformed NBD_REP_SERVER');
      out.push({ name, description: f.bytes(f.remaining)!.toString('utf8') });
      continue;
    }
    if (r.type === REP.ACK) break;
    if (r.type === REP.ERR_TLS_REQD) throw new BlockError('EPERM', 'Server requires TLS');
    throw new BlockError('EIO', `Server refused NBD_OPT_LIST: ${replyMessage(r)}`);
  }
  ch.send(OPT.ABORT);
  return out;
}
