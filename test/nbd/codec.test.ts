import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  ByteQueue,
  OptionReplyParser,
  OptionRequestParser,
  ProtocolError,
  ReplyParser,
  RequestParser,
  decodeInfoRequest,
  decodeMetaContextRequest,
  encodeChunkHeader,
  encodeErrorPayload,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOptionReply,
  encodeOptionRequest,
  encodeRequest,
  encodeSimpleReply,
  u64ToNumber,
  type NbdReply,
} from '../../src/nbd/codec.js';
import { CMD, CMD_FLAG, MAX_PAYLOAD, OPT, REP, REPLY_FLAG_DONE, REPLY_TYPE } from '../../src/nbd/protocol.js';
import { patterned } from './helpers.js';

/** Feeds `wire` split at `cut` (two pieces), then in 1-byte chunks, collecting messages. */
function parseSplit<T>(make: () => { feed(b: Buffer): void; next(): T | null }, wire: Buffer): T[][] {
  const runs: T[][] = [];
  for (let cut = 0; cut <= wire.length; cut++) {
    const p = make();
    const out: T[] = [];
    for (const piece of [wire.subarray(0, cut), wire.subarray(cut)]) {
      p.feed(Buffer.from(piece));
      for (let m = p.next(); m !== null; m = p.next()) out.push(m);
    }
    runs.push(out);
  }
  const p = make();
  const out: T[] = [];
  for (let i = 0; i < wire.length; i++) {
    p.feed(wire.subarray(i, i + 1));
    for (let m = p.next(); m !== null; m = p.next()) out.push(m);
  }
  runs.push(out);
  return runs;
}

test('requests (compact and extended, with write payloads) parse identically at every split offset', () => {
  for (const extended of [false, true]) {
    const payload = patterned(300, 3);
    const reqs = [
      { flags: 0, type: CMD.READ, cookie: 1n, offset: 4096, length: 512 },
      { flags: CMD_FLAG.FUA, type: CMD.WRITE, cookie: 0xfffffffffffffffen, offset: 2 ** 40, length: payload.length },
      { flags: CMD_FLAG.NO_HOLE, type: CMD.WRITE_ZEROES, cookie: 3n, offset: 0, length: 65536 },
      { flags: 0, type: CMD.FLUSH, cookie: 4n, offset: 0, length: 0 },
    ];
    const wire = Buffer.concat(reqs.flatMap((r) => (r.type === CMD.WRITE ? [encodeRequest(r, extended), payload] : [encodeRequest(r, extended)])));
    for (const msgs of parseSplit(() => new RequestParser(extended), wire)) {
      assert.equal(msgs.length, 4);
      msgs.forEach((m, i) => {
        const r = reqs[i]!;
        assert.equal(m.type, r.type);
        assert.equal(m.flags, r.flags);
        assert.equal(m.cookie, r.cookie);
        assert.equal(m.offset, r.offset);
        assert.equal(m.length, r.length);
      });
      assert.ok(msgs[1]!.data!.equals(payload));
      assert.equal(msgs[0]!.data, undefined);
    }
  }
});

test('a large write payload is copied as its bytes arrive: no chunk is copied twice, the request comes out whole, the next one after it', () => {
  for (const extended of [false, true]) {
    const payload = patterned(3 * 1024 * 1024 + 77, 5);
    const write = { flags: 0, type: CMD.WRITE, cookie: 7n, offset: 512, length: payload.length };
    const flush = { flags: 0, type: CMD.FLUSH, cookie: 8n, offset: 0, length: 0 };
    const wire = Buffer.concat([encodeRequest(write, extended), payload, encodeRequest(flush, extended)]);
    const p = new RequestParser(extended);
    const out = [];
    let queuedMax = 0;
    // 64 KiB pieces (a socket read), the last one carrying the flush's header too
    for (let at = 0; at < wire.length; at += 65536) {
      p.feed(Buffer.from(wire.subarray(at, at + 65536)));
      for (let m = p.next(); m !== null; m = p.next()) out.push(m);
      queuedMax = Math.max(queuedMax, p.queue.length);
    }
    assert.equal(out.length, 2);
    assert.equal(out[0]!.cookie, 7n);
    assert.ok(out[0]!.data!.equals(payload));
    assert.equal(out[1]!.type, CMD.FLUSH);
    // what arrived was moved into the request's buffer at once, never left to pile up
    assert.equal(queuedMax, 0);
  }
});

test('offsets past 2^53 are reported as null, never rounded', () => {
  const b = encodeRequest({ flags: 0, type: CMD.READ, cookie: 1n, offset: 0, length: 1 }, false);
  b.writeBigUInt64BE(2n ** 60n, 16);
  const p = new RequestParser(false);
  p.feed(b);
  assert.equal(p.next()!.offset, null);
  assert.equal(u64ToNumber(2n ** 53n), null);
  assert.equal(u64ToNumber(2n ** 53n - 1n), Number.MAX_SAFE_INTEGER);
});

test('bad request magic and oversized write payloads are protocol errors', () => {
  const bad = encodeRequest({ flags: 0, type: CMD.READ, cookie: 1n, offset: 0, length: 1 }, false);
  bad.writeUInt32BE(0xdeadbeef, 0);
  const p = new RequestParser(false);
  p.feed(bad);
  assert.throws(() => p.next(), ProtocolError);
  // an extended request must not be accepted on a compact connection
  const q = new RequestParser(false);
  q.feed(Buffer.concat([encodeRequest({ flags: 0, type: CMD.READ, cookie: 1n, offset: 0, length: 1 }, true)]));
  assert.throws(() => q.next(), ProtocolError);
  const big = new RequestParser(false);
  big.feed(encodeRequest({ flags: 0, type: CMD.WRITE, cookie: 1n, offset: 0, length: MAX_PAYLOAD + 1 }, false));
  assert.throws(() => big.next(), /exceeds the maximum/);
  const huge = new RequestParser(false);
  huge.feed(encodeRequest({ flags: 0, type: CMD.WRITE, cookie: 1n, offset: 0, length: 0xffffffff }, false));
  assert.throws(() => huge.next(), ProtocolError);
});

test('simple, structured and extended replies parse at every split offset', () => {
  const data = patterned(100, 9);
  const hole = Buffer.alloc(12);
  hole.writeBigUInt64BE(4096n, 0);
  hole.writeUInt32BE(512, 8);
  const dataPayload = Buffer.concat([Buffer.alloc(8), data]);
  const err = encodeErrorPayload(22, 'bad');
  const wire = Buffer.concat([
    encodeSimpleReply(0, 7n),
    data, // simple read reply data for cookie 7 (100 bytes)
    encodeSimpleReply(5, 8n),
    encodeChunkHeader(0, REPLY_TYPE.OFFSET_HOLE, 9n, 12, false),
    hole,
    encodeChunkHeader(REPLY_FLAG_DONE, REPLY_TYPE.OFFSET_DATA, 9n, dataPayload.length, false),
    dataPayload,
    encodeChunkHeader(REPLY_FLAG_DONE, REPLY_TYPE.ERROR, 10n, err.length, true, 123),
    err,
    encodeChunkHeader(REPLY_FLAG_DONE, REPLY_TYPE.NONE, 11n, 0, true),
  ]);
  const readLen = (c: bigint) => (c === 7n ? 100 : undefined);
  for (const msgs of parseSplit(() => new ReplyParser(readLen), wire)) {
    assert.equal(msgs.length, 6);
    const [a, b, c, d, e, f] = msgs as [NbdReply, NbdReply, NbdReply, NbdReply, NbdReply, NbdReply];
    assert.ok(a.kind === 'simple' && a.cookie === 7n && a.error === 0 && a.data!.equals(data));
    assert.ok(b.kind === 'simple' && b.cookie === 8n && b.error === 5 && b.data === undefined);
    assert.ok(c.kind === 'chunk' && c.type === REPLY_TYPE.OFFSET_HOLE && c.flags === 0 && c.payload.equals(hole));
    assert.ok(d.kind === 'chunk' && d.type === REPLY_TYPE.OFFSET_DATA && d.flags === REPLY_FLAG_DONE && d.payload.equals(dataPayload));
    assert.ok(e.kind === 'chunk' && e.cookie === 10n && e.payload.equals(err));
    assert.ok(f.kind === 'chunk' && f.type === REPLY_TYPE.NONE && f.payload.length === 0);
  }
});

test('option requests and replies parse at every split offset', () => {
  const reqs = [
    encodeOptionRequest(OPT.STRUCTURED_REPLY),
    encodeOptionRequest(OPT.GO, encodeInfoRequest('disk0', [1, 3])),
    encodeOptionRequest(OPT.SET_META_CONTEXT, encodeMetaContextRequest('disk0', ['base:allocation'])),
  ];
  for (const msgs of parseSplit(() => new OptionRequestParser(), Buffer.concat(reqs))) {
    assert.deepEqual(
      msgs.map((m) => m.option),
      [OPT.STRUCTURED_REPLY, OPT.GO, OPT.SET_META_CONTEXT],
    );
    assert.deepEqual(decodeInfoRequest(msgs[1]!.data), { name: 'disk0', requests: [1, 3] });
    assert.deepEqual(decodeMetaContextRequest(msgs[2]!.data), { name: 'disk0', queries: ['base:allocation'] });
  }
  const reps = Buffer.concat([encodeOptionReply(OPT.LIST, REP.SERVER, Buffer.from('abc')), encodeOptionReply(OPT.LIST, REP.ACK), encodeOptionReply(OPT.GO, REP.ERR_UNKNOWN, Buffer.from('no'))]);
  for (const msgs of parseSplit(() => new OptionReplyParser(), reps)) {
    assert.deepEqual(
      msgs.map((m) => [m.option, m.type, m.data.toString()]),
      [
        [OPT.LIST, REP.SERVER, 'abc'],
        [OPT.LIST, REP.ACK, ''],
        [OPT.GO, REP.ERR_UNKNOWN, "no"],
      ],
    );
  }
});

test('malformed option payloads decode to null instead of throwing', () => {
  assert.equal(decodeInfoRequest(Buffer.from([0, 0, 0, 9, 1])), null);
  assert.equal(decodeInfoRequest(Buffer.concat([encodeInfoRequest('x', [1]), Buffer.from([0])])), null);
  assert.equal(decodeMetaContextRequest(Buffer.from([0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff])), null);
  const p = new OptionRequestParser();
  const b = encodeOptionRequest(OPT.GO);
  b.writeUInt32BE(1 << 30, 12);
  p.feed(b);
  assert.throws(() => p.next(), /too long/);
});

test('ByteQueue hands out exact bytes across chunk boundaries', () => {
  const q = new ByteQueue();
  const src = patterned(1000, 5);
  for (let i = 0; i < 1000; i += 7) q.push(src.subarray(i, i + 7));
  let pos = 0;
  for (const n of [1, 13, 100, 0, 500, 386]) {
    assert.ok(q.take(n).equals(src.subarray(pos, pos + n)));
    pos += n;
  }
  assert.equal(q.length, 0);
  assert.throws(() => q.take(1), RangeError);
});
