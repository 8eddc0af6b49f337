// The QMP protocol as a client sees it, against `./bin/lockstep daemon` in a child process:
// greeting, negotiation, id echo, errors, several clients, events, hostile input.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { connect } from 'node:net';
import { tempDir } from '../helpers/graph.js';
import { startDaemon } from '../helpers/daemon.js';
import { QmpClient, QmpCommandError } from '../../src/qmp/client.js';

/** Sends raw text on a fresh connection and collects `count` messages after the greeting. */
async function rawExchange(path: string, input: string | Buffer, count: number): Promise<Array<Record<string, unknown>>> {
  const c = await QmpClient.connect({ type: 'unix', path });
  try {
    c.sendRaw(input);
    const out: Array<Record<string, unknown>> = [];
    for (let i = 0; i < count; i++) out.push(await c.nextReply());
    return out;
  } finally {
    c.close();
  }
}

test('QMP protocol', async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, dir, ['--blockdev', 'driver=memory,node-name=m0,size=1M']);

  await t.test('greeting is shaped like QEMU 7.2 and commands wait for negotiation', async () => {
    const c = await QmpClient.connect({ type: 'unix', path: d.qmpPath });
    t.after(() => c.close());
    assert.deepEqual(Object.keys(c.greeting!), ['QMP']);
    assert.deepEqual(c.greeting!.QMP.capabilities, ['oob']);
    assert.deepEqual(Object.keys(c.greeting!.QMP.version).sort(), ['package', 'qemu']);
    assert.deepEqual(c.greeting!.QMP.version.qemu, { major: 7, minor: 2, micro: 0 });
    await assert.rejects(c.execute('query-version'), {
      errorClass: 'CommandNotFound',
      desc: "Expecting capabilities negotiation with 'qmp_capabilities'",
    });
    await assert.rejects(c.execute('no-such-command'), { errorClass: 'CommandNotFound', desc: "Expecting capabilities negotiation with 'qmp_capabilities'" });
    assert.deepEqual(await c.execute('qmp_capabilities'), {});
    await assert.rejects(c.execute('qmp_capabilities'), {
      errorClass: 'CommandNotFound',
      desc: 'Capabilities negotiation is already complete, command ignored',
    });
    assert.deepEqual(await c.execute('query-version'), c.greeting!.QMP.version);
  });

  await t.test('ids of any JSON type are echoed; unknown commands and bad requests get QEMU errors', async () => {
    const replies = await rawExchange(
      d.qmpPath,
      [
        '{"execute":"qmp_capabilities","id":{"a":[1,2]}}',
        '{"execute":"foo","id":5}',
        '{"execute":"query-status","id":"abc"}',
        '[1]',
        '{"foo":1}',
        '{"execute":1}',
        '{"execute":"query-version","arguments":[]}',
        '{"execute":"query-version","arguments":{"a":1}}',
        '{"id":1}',
        '{"exec-oob":"query-version"}',
      ].join('\n'),
      10,
    );
    assert.deepEqual(replies, [
      { return: {}, id: { a: [1, 2] } },
      { id: 5, error: { class: 'CommandNotFound', desc: 'The command foo has not been found' } },
      { return: { status: 'running', singlestep: false, running: true }, id: 'abc' },
      { error: { class: 'GenericError', desc: 'QMP input must be a JSON object' } },
      { error: { class: 'GenericError', desc: "QMP input member 'foo' is unexpected" } },
      { error: { class: 'GenericError', desc: "QMP input member 'execute' must be a string" } },
      { error: { class: 'GenericError', desc: "QMP input member 'arguments' must be an object" } },
      { error: { class: 'GenericError', desc: "Parameter 'a' is unexpected" } },
      { id: 1, error: { class: 'GenericError', desc: "QMP input lacks member 'execute'" } },
      { error: { class: 'GenericError', desc: "QMP input member 'exec-oob' is unexpected" } },
    ]);
  });

  await t.test('malformed JSON and oversized messages are answered and the connection carries on', async () => {
    const big = JSON.stringify({ execute: 'query-version', arguments: { pad: 'x'.repeat(2 * 1024 * 1024) } });
    const replies = await rawExchange(
      d.qmpPath,
      '{"execute":"qmp_capabilities"}{"execute": foo}\n@\n' + big + '\n{"execute":"query-version","id":"after"}\n',
      5,
    );
    assert.deepEqual(replies[0], { return: {} });
    assert.deepEqual(replies[1], { error: { class: 'GenericError', desc: "JSON parse error, invalid keyword 'foo'" } });
    assert.deepEqual(replies[2], { error: { class: 'GenericError', desc: "JSON parse error, stray '@'" } });
    assert.deepEqual(replies[3], { error: { class: 'GenericError', desc: 'JSON parse error, message larger than 1048576 bytes' } });
    assert.equal(replies[4]!.id, 'after');
    assert.deepEqual((replies[4]!.return as { qemu: unknown }).qemu, { major: 7, minor: 2, micro: 0 });
  });

  await t.test('several clients at once each get their own replies, in order', async () => {
    const clients = await Promise.all([d.client(), d.client(), d.client(), d.client()]);
    const results = await Promise.all(
      clients.map(async (c, i) => {
        const out: unknown[] = [];
        for (let k = 0; k < 20; k++) {
          const name = `c${i}k${k}`;
          await c.execute('blockdev-add', { driver: 'null-co', 'node-name': name, size: 4096 });
          const nodes = (await c.execute('query-named-block-nodes', { flat: true })) as Array<{ 'node-name': string }>;
          out.push(nodes.some((n) => n['node-name'] === name));
          await c.execute('blockdev-del', { 'node-name': name });
        }
        return out;
      }),
    );
    for (const r of results) assert.deepEqual(r, Array(20).fill(true));
  });

  await t.test('hostile clients: random bytes, abrupt disconnects and a client that never reads do not disturb others', async () => {
    const good = await d.client();
    let seed = 12345;
    const rnd = () => {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff;
      return seed;
    };
    for (let round = 0; round < 20; round++) {
      const junk = Buffer.alloc(1 + (rnd() % 4096));
      for (let i = 0; i < junk.length; i++) junk[i] = rnd() & 0xff;
      await new Promise<void>((resolve) => {
        const s = connect(d.qmpPath, () => {
          s.write(junk);
          if (round % 2) s.destroy();
          else s.end();
        });
        s.on('error', () => {});
        s.on('close', () => resolve());
        s.resume();
      });
    }
    // a client that floods requests and never reads its replies
    const flooder = connect(d.qmpPath);
    flooder.on('error', () => {});
    await new Promise<void>((r) => flooder.once('connect', () => r()));
    flooder.write('{"execute":"qmp_capabilities"}');
    const req = '{"execute":"query-named-block-nodes"}\n'.repeat(200);
    for (let i = 0; i < 20; i++) flooder.write(req);
    assert.deepEqual((await good.execute('query-version')) as unknown, good.greeting!.QMP.version);
    const nodes = (await good.execute('query-named-block-nodes')) as Array<{ 'node-name': string }>;
    assert.deepEqual(
      nodes.map((n) => n['node-name']),
      ['m0'],
    );
    flooder.destroy();
    assert.equal(d.proc.exitCode, null);
  });

  await t.test('connections past the limit are refused and the monitor recovers when they go', async () => {
    const idle = [];
    for (let i = 0; i < 70; i++) {
      const s = connect(d.qmpPath);
      s.on('error', () => {});
      s.resume();
      idle.push(s);
    }
    await Promise.all(idle.map((s) => new Promise((r) => (s.connecting ? s.once('connect', r) : r(null)))));
    // the monitor holds at most 64 connections (the ones from earlier subtests count too)
    const closed = await Promise.all(
      idle.map((s) => new Promise<boolean>((r) => {
        const timer = setTimeout(() => r(false), 1000);
        s.once('close', () => {
          clearTimeout(timer);
          r(true);
        });
      })),
    );
    assert.ok(closed.filter(Boolean).length >= 6, 'connections over the limit were closed');
    for (const s of idle) s.destroy();
    // the daemon sees the closes asynchronously: retry (bounded) until a slot is free
    let c: QmpClient | null = null;
    for (let i = 0; i < 100 && !c; i++) {
      c = await d.client().catch(() => null);
      if (!c) await new Promise((r) => setTimeout(r, 20));
    }
    assert.ok(c, 'a client gets in again');
    assert.deepEqual((await c.execute('query-status')) as unknown, { status: 'running', singlestep: false, running: true });
  });

  await t.test('events carry QEMU timestamps and reach every negotiated client; quit exits 0', async () => {
    const a = await d.client();
    const b = await d.client();
    const before = Date.now();
    assert.deepEqual(await a.execute('quit'), {});
    for (const c of [a, b]) {
      const ev = await c.waitEvent('SHUTDOWN');
      assert.deepEqual(ev.data, { guest: false, reason: 'host-qmp-quit' });
      assert.deepEqual(Object.keys(ev.timestamp), ['seconds', 'microseconds']);
      const ms = ev.timestamp.seconds * 1000 + ev.timestamp.microseconds / 1000;
      assert.ok(Number.isInteger(ev.timestamp.microseconds) && ev.timestamp.microseconds < 1e6);
      assert.ok(ms >= before - 1000 && ms <= Date.now() + 1000, `timestamp ${ms} is now`);
    }
    assert.equal(await d.exited, 0);
    assert.ok(d.logs().some((l) => l.msg === 'shut down' && l.reason === 'host-qmp-quit'));
    assert.ok(b.closed || (await b.execute('query-version').then(() => false, (e: unknown) => !(e instanceof QmpCommandError))));
  });
});
