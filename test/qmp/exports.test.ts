// The export table's rules, with a recording stand-in for the NBD server: loopback-only
// writable exports without TLS, ids and names, BLOCK_EXPORT_DELETED, stop removes everything.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { newGraph } from '../helpers/graph.js';
import { ExportTable, isLoopbackHost, type NbdServerConfig, type NbdServerHandle } from '../../src/qmp/exports.js';
import { ObjectTable } from '../../src/qmp/objects.js';
import { EventBus, type QmpEventMessage } from '../../src/qmp/events.js';
import { Logger } from '../../src/util/log.js';

function setup(insecure = false) {
  const graph = newGraph();
  const events = new EventBus();
  const seen: QmpEventMessage[] = [];
  events.subscribe((m) => seen.push(m));
  const logLines: string[] = [];
  const log = new Logger('debug', (l) => logLines.push(l));
  const calls: string[] = [];
  const configs: NbdServerConfig[] = [];
  // a fake with the real NbdServer's signatures: it records the calls instead of listening
  const factory = (cfg: NbdServerConfig): NbdServerHandle => {
    configs.push(cfg);
    return {
      listen: async (a) => {
        calls.push(`listen ${a.type === 'unix' ? a.path : `${a.host}:${a.port}`}`);
        return a.type === 'unix' ? a : { type: 'inet', host: a.host, port: Number(a.port) === 0 ? 40000 : Number(a.port) };
      },
      addExport: (e) => {
        const nodeName = typeof e.node === 'string' ? e.node : e.node.name;
        calls.push(`add ${e.name} ${nodeName} ${e.writable ? 'rw' : 'ro'}`);
        return { name: e.name, description: e.description ?? '', nodeName, writable: e.writable ?? false, multiConn: false, connections: 0 };
      },
      removeExport: async (name, mode) => {
        calls.push(`remove ${name} ${mode}`);
      },
      close: async () => {
        calls.push('close');
      },
    };
  };
  const table = new ExportTable(graph, new ObjectTable(graph), events, log, factory, insecure);
  return { graph, table, seen, calls, configs, logLines };
}

test('loopback detection', () => {
  for (const h of ['127.0.0.1', '127.8.9.10', '::1', '[::1]', 'localhost', '::ffff:127.0.0.1']) assert.equal(isLoopbackHost(h), true, h);
  for (const h of ['0.0.0.0', '::', '192.168.1.2', 'example.com', '10.0.0.1', '::ffff:10.0.0.1']) assert.equal(isLoopbackHost(h), false, h);
});

test('writable exports on a plain non-loopback server are refused unless --insecure; read-only ones are fine', async () => {
  const { graph, table, calls, logLines } = setup();
  await graph.open({ driver: 'null-co', 'node-name': 'n0' }, { monitorOwned: true });
  await table.startNbd({ addrs: [{ type: 'inet', host: '0.0.0.0', port: 0 }] });
  assert.deepEqual(table.nbdAddresses, [{ type: 'inet', host: '0.0.0.0', port: 40000 }]);
  assert.throws(() => table.add({ id: 'e0', nodeName: 'n0', writable: true }), {
    message: "Refusing writable export 'n0': the NBD server listens on a non-loopback address without TLS (use tls-creds, a loopback address, or --insecure)",
  });
  table.add({ id: 'e1', nodeName: 'n0', writable: false });
  assert.deepEqual(calls, ['listen 0.0.0.0:0', 'add n0 n0 ro']);
  assert.ok(logLines.some((l) => l.includes('only read-only exports are allowed')));

  const ins = setup(true);
  await ins.graph.open({ driver: 'null-co', 'node-name': 'n0' }, { monitorOwned: true });
  await ins.table.startNbd({ addrs: [{ type: 'inet', host: '0.0.0.0', port: 10809 }] });
  ins.table.add({ id: 'e0', nodeName: 'n0', writable: true });
  assert.deepEqual(ins.calls, ['listen 0.0.0.0:10809', 'add n0 n0 rw']);
  assert.ok(ins.logLines.some((l) => l.includes('"level":"warn"') && l.includes('--insecure')));
});

test('ids and names are unique, deletion emits BLOCK_EXPORT_DELETED, stop removes every export', async () => {
  const { graph, table, calls, seen } = setup();
  await graph.open({ driver: 'null-co', 'node-name': 'n0' }, { monitorOwned: true });
  assert.throws(() => table.add({ id: 'e0', nodeName: 'n0', writable: false }), { message: 'NBD server not running' });
  await table.startNbd({ addrs: [{ type: 'unix', path: '/tmp/x.sock' }, { type: 'inet', host: '127.0.0.1', port: 0 }] });
  await assert.rejects(table.startNbd({ addrs: [{ type: 'unix', path: '/tmp/y.sock' }] }), { message: 'NBD server already running' });
  table.add({ id: 'e0', nodeName: 'n0', writable: true, name: 'disk' });
  assert.throws(() => table.add({ id: 'e0', nodeName: 'n0', writable: false }), { message: "Block export id 'e0' is already in use" });
  assert.throws(() => table.add({ id: 'e1', nodeName: 'n0', writable: false, name: 'disk' }), { message: "NBD server already has export named 'disk'" });
  assert.throws(() => table.add({ id: 'e1', nodeName: 'zz', writable: false }), { message: "Cannot find device='' nor node-name='zz'" });
  table.add({ id: 'e1', nodeName: 'n0', writable: false });
  assert.deepEqual(table.query(), [
    { type: 'nbd', id: 'e0', 'node-name': 'n0', 'shutting-down': false },
    { type: 'nbd', id: 'e1', 'node-name': 'n0', 'shutting-down': false },
  ]);
  await table.del('e0', 'hard');
  await assert.rejects(table.del('e0'), { message: "Export 'e0' is not found" });
  await table.stopNbd();
  await assert.rejects(table.stopNbd(), { message: 'NBD server not running' });
  assert.deepEqual(table.query(), []);
  assert.deepEqual(calls, ['listen /tmp/x.sock', 'listen 127.0.0.1:0', 'add disk n0 rw', 'add n0 n0 ro', 'remove disk hard', 'close']);
  assert.deepEqual(
    seen.map((e) => [e.event, e.data]),
    [
      ['BLOCK_EXPORT_DELETED', { id: 'e0' }],
      ['BLOCK_EXPORT_DELETED', { id: 'e1' }],
    ],
  );
});
