// Hostile peers: random and mutated handshakes and requests against a server that also
// serves a well-behaved client. Bounded in count; every hostile connection ends by itself
// (the peer half-closes, the handshake has a short timeout).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { connect, type Socket } from 'node:net';
import { NbdClient } from '../../src/nbd/client/client.js';
import {
  ByteQueue,
  OptionReplyParser,
  ReplyParser,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOptionRequest,
  encodeRequest,
  type NbdReply,
} from '../../src/nbd/codec.js';
import { CMD, CMD_FLAG, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, NBD_ERR, OPT, REP, REPLY_TYPE } from '../../src/nbd/protocol.js';
import { patterned, serveMemory } from './helpers.js';
import type { SocketAddress } from '../../src/util/socket-address.js';

const GOLDEN_SIZE = 1 << 20;

function prng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 0x100000000;
  };
}

function open(addr: SocketAddress & { type: 'inet' }): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = connect({ host: addr.host, port: Number(addr.port) });
    s.once('connect', () => resolve(s));
    s.once('error', reject);
  });
}

/** Sends `bytes`, half-closes, and resolves once the server has closed its side. */
async function hostile(addr: SocketAddress & { type: 'inet' }, bytes: Buffer): Promise<void> {
  const s = await open(addr);
  s.on('error', () => {});
  s.resume();
  const closed = new Promise<void>((r) => s.once('close', () => r()));
  s.end(bytes);
  await closed;
}

function handshakeBytes(exportName: string, structured: boolean): Buffer {
  const parts: Buffer[] = [Buffer.from([0, 0, 0, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES])];
  if (structured) {
    parts.push(encodeOptionRequest(OPT.STRUCTURED_REPLY));
    parts.push(encodeOptionRequest(OPT.SET_META_CONTEXT, encodeMetaContextRequest(exportName, ['base:allocation'])));
  }
  parts.push(encodeOptionRequest(OPT.LIST));
  parts.push(encodeOptionRequest(OPT.GO, encodeInfoRequest(exportName, [1, 3])));
  return Buffer.concat(parts);
}

/** A real handshake, then raw access to the transmission phase. */
async function transmission(addr: SocketAddress & { type: 'inet' }, exportName: string) {
  const s = await open(addr);
  s.on('error', () => {});
  const q = new ByteQueue();
  let wake: (() => void) | null = null;
  let ended = false;
  s.on('data', (c: Buffer) => (q.push(c), wake?.()));
  s.on('close', () => ((ended = true), wake?.()));
  const more = () => new Promise<void>((r) => (wake = r));
  while (q.length < 18) await more();
  q.take(18);
  s.write(handshakeBytes(exportName, true));
  const op = new OptionReplyParser(q);
  for (;;) {
    const r = op.next();
    if (!r) {
      await more();
      continue;
    }
    if (r.option === OPT.GO && r.type === REP.ACK) break;
    assert.ok(!(r.type & 0x80000000), `handshake error ${r.type}`);
  }
  const rp = new ReplyParser(() => undefined, q);
  return {
    socket: s,
    send: (b: Buffer) => s.write(b),
    /** next reply, or null once the server has closed the connection */
    async reply(): Promise<NbdReply | null> {
      for (;;) {
        const r = rp.next();
        if (r) return r;
        if (ended) return null;
        await more();
      }
    },
    async closedByServer(): Promise<boolean> {
      while (!ended) await more();
      return true;
    },
  };
}

function errorOf(r: NbdReply | null): number {
  assert.ok(r, 'expected a reply, the server closed the connection');
  if (r.kind === 'simple') return r.error;
  assert.equal(r.type, REPLY_TYPE.ERROR);
  return r.payload.readUInt32BE(0);
}

test('hostile peers get protocol errors or are dropped; the server keeps serving and the data is intact', async (t) => {
  const s = await serveMemory(t, { size: 4 << 20, server: { handshakeTimeoutMs: 500 } });
  const golden = await s.graph.open({ driver: 'memory', size: GOLDEN_SIZE, 'node-name': 'golden' }, { monitorOwned: true });
  const goldenData = patterned(GOLDEN_SIZE, 1234);
  await golden.write(0, goldenData);
  s.server.addExport({ name: 'ro', node: golden });
  const memBefore = process.memoryUsage().arrayBuffers;

  // The well-behaved client works the whole time.
  const good = await NbdClient.connect({ address: s.tcp, exportName: 'disk0' });
  t.after(() => good.destroy());
  const expected = Buffer.alloc(4 << 20);
  let stop = false;
  const goodWork = (async () => {
    for (let i = 0; !stop && i < 400; i++) {
      const off = (i * 37 * 4096) % ((4 << 20) - 65536);
      const d = patterned(65536, i + 1);
      await good.write(off, d);
      d.copy(expected, off);
      assert.ok((await good.read(off, 65536)).equals(d));
    }
  })();

  // 1. Deterministic hostile requests after a valid handshake, one connection each.
  const size = GOLDEN_SIZE;
  const replyCases: Array<[string, Buffer, number]> = [
    ['read past the end', encodeRequest({ flags: 0, type: CMD.READ, cookie: 1n, offset: size - 1, length: 2 }, false), NBD_ERR.EINVAL],
    ['read of 4 GiB', encodeRequest({ flags: 0, type: CMD.READ, cookie: 2n, offset: 0, length: 0xffffffff }, false), NBD_ERR.EINVAL],
    ['offset past 2^63', (() => { const b = encodeRequest({ flags: 0, type: CMD.READ, cookie: 3n, offset: 0, length: 1 }, false); b.writeBigUInt64BE(0xfffffffffffffff0n, 16); return b; })(), NBD_ERR.EINVAL],
    ['unknown command', encodeRequest({ flags: 0, type: 99, cookie: 4n, offset: 0, length: 1 }, false), NBD_ERR.EINVAL],
    ['unknown flags', encodeRequest({ flags: 0x8000, type: CMD.READ, cookie: 5n, offset: 0, length: 1 }, false), NBD_ERR.EINVAL],
    ['fast-zero on a read', encodeRequest({ flags: CMD_FLAG.FAST_ZERO, type: CMD.READ, cookie: 6n, offset: 0, length: 1 }, false), NBD_ERR.EINVAL],
    ['write to the read-only export', Buffer.concat([encodeRequest({ flags: 0, type: CMD.WRITE, cookie: 7n, offset: 0, length: 4 }, false), Buffer.alloc(4, 0xee)]), NBD_ERR.EPERM],
    ['trim on the read-only export', encodeRequest({ flags: 0, type: CMD.TRIM, cookie: 8n, offset: 0, length: 4096 }, false), NBD_ERR.EPERM],
    ['block status of length 0', encodeRequest({ flags: 0, type: CMD.BLOCK_STATUS, cookie: 9n, offset: 0, length: 0 }, false), NBD_ERR.EINVAL],
    ['flush with a length', encodeRequest({ flags: 0, type: CMD.FLUSH, cookie: 10n, offset: 0, length: 5 }, false), NBD_ERR.EINVAL],
  ];
  for (const [what, bytes, err] of replyCases) {
    const c = await transmission(s.tcp, 'ro');
    c.send(bytes);
    assert.equal(errorOf(await c.reply()), err, what);
    // the connection survives a request error
    c.send(encodeRequest({ flags: 0, type: CMD.READ, cookie: 77n, offset: 0, length: 8 }, false));
    const ok = await c.reply();
    assert.ok(ok && ok.kind === 'chunk' && ok.type === REPLY_TYPE.OFFSET_DATA && ok.payload.subarray(8).equals(goldenData.subarray(0, 8)), what);
    c.socket.destroy();
  }
  const dropCases: Array<[string, Buffer]> = [
    ['bad request magic', (() => { const b = encodeRequest({ flags: 0, type: CMD.READ, cookie: 1n, offset: 0, length: 1 }, false); b.writeUInt32BE(0x12345678, 0); return b; })()],
    ['write claiming a 4 GiB payload', encodeRequest({ flags: 0, type: CMD.WRITE, cookie: 2n, offset: 0, length: 0xffffffff }, false)],
    ['write over the 32 MiB payload limit', encodeRequest({ flags: 0, type: CMD.WRITE, cookie: 3n, offset: 0, length: (32 << 20) + 1 }, false)],
  ];
  for (const [what, bytes] of dropCases) {
    const c = await transmission(s.tcp, 'ro');
    c.send(bytes);
    assert.equal(await c.reply(), null, what);
    assert.ok(await c.closedByServer(), what);
  }
  // disconnect in the middle of a write payload and of a header
  for (const cut of [10, 28 + 100]) {
    const c = await transmission(s.tcp, 'ro');
    const w = Buffer.concat([encodeRequest({ flags: 0, type: CMD.WRITE, cookie: 1n, offset: 0, length: 4096 }, false), Buffer.alloc(4096, 0x66)]);
    c.socket.end(w.subarray(0, cut));
    assert.ok(await c.closedByServer());
  }

  // 2. Random and mutated byte streams, handshake and transmission, bounded in count.
  const rnd = prng(20261125);
  const template = handshakeBytes('ro', true);
  const requestTemplate = Buffer.concat([
    encodeRequest({ flags: 0, type: CMD.READ, cookie: 1n, offset: 0, length: 4096 }, false),
    encodeRequest({ flags: 0, type: CMD.BLOCK_STATUS, cookie: 2n, offset: 0, length: size }, false),
    encodeRequest({ flags: CMD_FLAG.FUA, type: CMD.WRITE, cookie: 3n, offset: 4096, length: 16 }, false),
    Buffer.alloc(16, 0xaa),
    encodeRequest({ flags: 0, type: CMD.FLUSH, cookie: 4n, offset: 0, length: 0 }, false),
  ]);
  const mutate = (b: Buffer): Buffer => {
    const m = Buffer.from(b);
    const flips = 1 + Math.floor(rnd() * 4);
    for (let i = 0; i < flips; i++) m[Math.floor(rnd() * m.length)] = Math.floor(rnd() * 256);
    const cut = rnd() < 0.3 ? Math.floor(rnd() * m.length) : m.length;
    return m.subarray(0, cut);
  };
  for (let round = 0; round < 25; round++) {
    const batch: Promise<void>[] = [];
    for (let i = 0; i < 8; i++) {
      const kind = rnd();
      if (kind < 0.3) {
        const junk = Buffer.alloc(Math.floor(rnd() * 600));
        for (let j = 0; j < junk.length; j++) junk[j] = Math.floor(rnd() * 256);
        batch.push(hostile(s.tcp, junk));
      } else if (kind < 0.65) {
        batch.push(hostile(s.tcp, mutate(template)));
      } else {
        batch.push(
          (async () => {
            const c = await transmission(s.tcp, 'ro');
            c.socket.end(mutate(requestTemplate));
            await c.closedByServer();
          })(),
        );
      }
    }
    await Promise.all(batch);
  }

  stop = true;
  await goodWork;
  assert.ok((await good.read(0, 4 << 20)).equals(expected));
  assert.ok((await golden.read(0, GOLDEN_SIZE)).equals(goldenData), 'the read-only export is unchanged');
  assert.ok((await s.node.read(0, 4 << 20)).equals(expected), 'the writable export holds exactly the good client\'s data');
  assert.equal(s.server.connectionCount, 1, 'only the good client is still connected');
  const grown = process.memoryUsage().arrayBuffers - memBefore;
  assert.ok(grown < 256 << 20, `buffer memory grew by ${grown} bytes`);
  await good.disconnect();
});
