// The server's option haggling, byte by byte from a raw socket.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { connect, type Socket } from 'node:net';
import { ByteQueue, OptionReplyParser, ReplyParser, encodeInfoRequest, encodeMetaContextRequest, encodeOptionRequest, encodeRequest, type OptionReply } from '../../src/nbd/codec.js';
import { CMD, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO, NBDMAGIC, OPT, REP, TFLAG } from '../../src/nbd/protocol.js';
import { serveMemory } from './helpers.js';
import { tempDir } from '../helpers/graph.js';
import { haveOpenssl, makeCerts } from './tls-certs.js';
import { loadTlsCreds, serverTlsConfig } from '../../src/nbd/tls.js';

class Raw {
  readonly q = new ByteQueue();
  private wake: (() => void) | null = null;
  ended = false;
  readonly replies = new OptionReplyParser(this.q);
  constructor(readonly s: Socket) {
    s.on('data', (c: Buffer) => (this.q.push(c), this.wake?.()));
    s.on('close', () => ((this.ended = true), this.wake?.()));
    s.on('error', () => {});
  }
  static async open(port: number): Promise<Raw> {
    const s = connect({ host: '127.0.0.1', port });
    await new Promise((r) => s.once('connect', r));
    return new Raw(s);
  }
  async bytes(n: number): Promise<Buffer> {
    while (this.q.length < n) {
      if (this.ended) throw new Error('closed');
      await new Promise<void>((r) => (this.wake = r));
    }
    return Buffer.from(this.q.take(n));
  }
  async reply(): Promise<OptionReply> {
    for (;;) {
      const r = this.replies.next();
      if (r) return r;
      if (this.ended) throw new Error('closed');
      await new Promise<void>((r2) => (this.wake = r2));
    }
  }
  async closed(): Promise<void> {
    while (!this.ended) await new Promise<void>((r) => (this.wake = r));
  }
  async greet(flags = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES): Promise<void> {
    const g = await this.bytes(18);
    assert.equal(g.readBigUInt64BE(0), NBDMAGIC);
    assert.equal(g.readBigUInt64BE(8), IHAVEOPT);
    assert.equal(g.readUInt16BE(16), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    const f = Buffer.alloc(4);
    f.writeUInt32BE(flags);
    this.s.write(f);
  }
  opt(option: number, data?: Buffer): void {
    this.s.write(encodeOptionRequest(option, data));
  }
}

test('option haggling: unknown options, INFO, meta contexts, then GO', async (t) => {
  const srv = await serveMemory(t, { size: 1 << 20 });
  const c = await Raw.open(srv.tcp.port);
  t.after(() => c.s.destroy());
  await c.greet();
  c.opt(200);
  assert.equal((await c.reply()).type, REP.ERR_UNSUP);
  c.opt(OPT.STARTTLS);
  assert.equal((await c.reply()).type, REP.ERR_POLICY, 'no TLS configured');
  c.opt(OPT.SET_META_CONTEXT, encodeMetaContextRequest('disk0', ['base:allocation']));
  assert.equal((await c.reply()).type, REP.ERR_INVALID, 'meta contexts need structured replies first');
  c.opt(OPT.LIST, Buffer.from('x'));
  assert.equal((await c.reply()).type, REP.ERR_INVALID);
  c.opt(OPT.INFO, Buffer.from([0, 0]));
  assert.equal((await c.reply()).type, REP.ERR_INVALID, 'malformed INFO');

  c.opt(OPT.INFO, encodeInfoRequest('disk0', [INFO.NAME, INFO.DESCRIPTION]));
  const infos: Buffer[] = [];
  for (let r = await c.reply(); r.type !== REP.ACK; r = await c.reply()) {
    assert.equal(r.type, REP.INFO);
    infos.push(r.data);
  }
  const exp = infos.find((d) => d.readUInt16BE(0) === INFO.EXPORT)!;
  assert.equal(exp.readBigUInt64BE(2), BigInt(1 << 20));
  assert.ok(exp.readUInt16BE(10) & TFLAG.SEND_FLUSH);
  assert.equal(infos.find((d) => d.readUInt16BE(0) === INFO.NAME)!.subarray(2).toString(), 'disk0');
  assert.equal(infos.find((d) => d.readUInt16BE(0) === INFO.DESCRIPTION)!.subarray(2).toString(), 'test disk');
  const bs = infos.find((d) => d.readUInt16BE(0) === INFO.BLOCK_SIZE)!;
  assert.deepEqual([bs.readUInt32BE(2), bs.readUInt32BE(6), bs.readUInt32BE(10)], [1, 4096, 32 << 20]);

  c.opt(OPT.STRUCTURED_REPLY);
  assert.equal((await c.reply()).type, REP.ACK);
  c.opt(OPT.LIST_META_CONTEXT, encodeMetaContextRequest('disk0', []));
  const listed = await c.reply();
  assert.equal(listed.type, REP.META_CONTEXT);
  assert.equal(listed.data.subarray(4).toString(), 'base:allocation');
  assert.equal((await c.reply()).type, REP.ACK);
  c.opt(OPT.SET_META_CONTEXT, encodeMetaContextRequest('disk0', ['qemu:dirty-bitmap:x', 'base:allocation']));
  const set = await c.reply();
  assert.equal(set.type, REP.META_CONTEXT);
  assert.equal(set.data.readUInt32BE(0), 1);
  assert.equal((await c.reply()).type, REP.ACK);
  c.opt(OPT.GO, encodeInfoRequest('nope', []));
  assert.equal((await c.reply()).type, REP.ERR_UNKNOWN);
  c.opt(OPT.GO, encodeInfoRequest('disk0', []));
  for (let r = await c.reply(); r.type !== REP.ACK; r = await c.reply()) assert.equal(r.type, REP.INFO);
  // transmission: block status works since base:allocation was set for this export
  c.s.write(encodeRequest({ flags: 0, type: CMD.BLOCK_STATUS, cookie: 5n, offset: 0, length: 4096 }, false));
  const rp = new ReplyParser(() => undefined, c.q);
  let rep = rp.next();
  while (!rep) {
    await new Promise((r) => setTimeout(r, 5));
    rep = rp.next();
  }
  assert.ok(rep.kind === 'chunk' && rep.cookie === 5n && rep.payload.readUInt32BE(0) === 1);
});

test('NBD_OPT_EXPORT_NAME with and without the 124 zero bytes', async (t) => {
  const srv = await serveMemory(t, { size: 1 << 20 });
  for (const noZeroes of [true, false]) {
    const c = await Raw.open(srv.tcp.port);
    t.after(() => c.s.destroy());
    await c.greet(FLAG_C_FIXED_NEWSTYLE | (noZeroes ? FLAG_C_NO_ZEROES : 0));
    c.opt(OPT.EXPORT_NAME, Buffer.from('disk0'));
    const r = await c.bytes(noZeroes ? 10 : 134);
    assert.equal(r.readBigUInt64BE(0), BigInt(1 << 20));
    assert.ok(r.readUInt16BE(8) & TFLAG.HAS_FLAGS);
    if (!noZeroes) assert.ok(r.subarray(10).equals(Buffer.alloc(124)));
    // simple replies: a read is a 16-byte header plus the data
    c.s.write(encodeRequest({ flags: 0, type: CMD.READ, cookie: 9n, offset: 0, length: 16 }, false));
    const rep = await c.bytes(32);
    assert.equal(rep.readUInt32BE(4), 0);
    assert.ok(rep.subarray(16).equals(Buffer.alloc(16)));
  }
  // an unknown name cannot be refused politely: the connection is dropped
  const bad = await Raw.open(srv.tcp.port);
  await bad.greet();
  bad.opt(OPT.EXPORT_NAME, Buffer.from('nope'));
  await bad.closed();
});

test('clients without fixed newstyle are dropped; ABORT is acknowledged', async (t) => {
  const srv = await serveMemory(t);
  const old = await Raw.open(srv.tcp.port);
  await old.greet(0);
  await old.closed();
  const c = await Raw.open(srv.tcp.port);
  await c.greet();
  c.opt(OPT.ABORT);
  assert.equal((await c.reply()).type, REP.ACK);
  await c.closed();
});

test('NBD_CMD_DISC: requests sent before it still get their replies', async (t) => {
  const srv = await serveMemory(t);
  const c = await Raw.open(srv.tcp.port);
  await c.greet();
  c.opt(OPT.EXPORT_NAME, Buffer.from('disk0'));
  await c.bytes(10);
  c.s.write(
    Buffer.concat([
      encodeRequest({ flags: 0, type: CMD.WRITE, cookie: 1n, offset: 0, length: 4 }, false),
      Buffer.from('abcd'),
      encodeRequest({ flags: 0, type: CMD.FLUSH, cookie: 2n, offset: 0, length: 0 }, false),
      encodeRequest({ flags: 0, type: CMD.DISC, cookie: 3n, offset: 0, length: 0 }, false),
    ]),
  );
  const replies = await c.bytes(32);
  assert.deepEqual([replies.readBigUInt64BE(8), replies.readBigUInt64BE(24)].sort(), [1n, 2n]);
  await c.closed();
  assert.ok((await srv.node.read(0, 4)).equals(Buffer.from('abcd')));
});

test('a client that stalls inside STARTTLS is dropped by the handshake timeout', async (t) => {
  if (!haveOpenssl()) {
    if (process.env.CI) assert.fail('openssl is required in CI');
    t.skip('openssl not installed');
    return;
  }
  const { serverDir } = makeCerts(tempDir(t, 'lockstep-tls-stall-'));
  const srv = await serveMemory(t, {
    server: { handshakeTimeoutMs: 300, tls: serverTlsConfig(loadTlsCreds({ id: 's', endpoint: 'server', dir: serverDir, verifyPeer: false })) },
  });
  const c = await Raw.open(srv.tcp.port);
  await c.greet();
  c.opt(OPT.GO, encodeInfoRequest('disk0', []));
  assert.equal((await c.reply()).type, REP.ERR_TLS_REQD);
  c.opt(OPT.STARTTLS);
  assert.equal((await c.reply()).type, REP.ACK);
  // ... and never starts the TLS handshake
  await c.closed();
  for (let i = 0; i < 100 && srv.server.connectionCount > 0; i++) await new Promise((r) => setTimeout(r, 10));
  assert.equal(srv.server.connectionCount, 0);
});
