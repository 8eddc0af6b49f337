// Block graph, object and HMP commands over QMP against `./bin/lockstep daemon`.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from '../helpers/graph.js';
import { startDaemon } from '../helpers/daemon.js';
import { makeTlsDirs, requireTool } from '../helpers/tls.js';
import type { QmpClient } from '../../src/qmp/client.js';

async function expectError(c: QmpClient, cmd: string, args: Record<string, unknown> | undefined, errorClass: string, desc: string): Promise<void> {
  await assert.rejects(c.execute(cmd, args), (e: { errorClass?: string; desc?: string }) => {
    assert.equal(e.desc, desc, `${cmd} ${JSON.stringify(args)}`);
    assert.equal(e.errorClass, errorClass);
    return true;
  });
}

type NodeInfo = Record<string, unknown> & { 'node-name': string; image: Record<string, unknown> };

test('block graph commands', async (t) => {
  const dir = tempDir(t);
  const img = join(dir, 'a.raw');
  writeFileSync(img, Buffer.alloc(1024 * 1024, 0x11));
  const d = await startDaemon(t, dir, []);
  const c = await d.client();

  await t.test('blockdev-add validates through the graph with QEMU messages', async () => {
    await expectError(c, 'blockdev-add', { 'node-name': 'x' }, 'GenericError', "Parameter 'driver' is missing");
    await expectError(c, 'blockdev-add', { driver: 'null-co', size: 1 }, 'GenericError', "'node-name' must be specified for the root node");
    await expectError(c, 'blockdev-add', { driver: 'null-cox', 'node-name': 'x' }, 'GenericError', "Parameter 'driver' does not accept value 'null-cox'");
    await expectError(c, 'blockdev-add', { driver: 'raw', 'node-name': 'x', file: { driver: 'null-co', bogus: 1 } }, 'GenericError', "Parameter 'file.bogus' is unexpected");
    await expectError(c, 'blockdev-add', { driver: 'raw', 'node-name': 'x', file: { driver: 'file' } }, 'GenericError', "Parameter 'file.filename' is missing");
    await expectError(c, 'blockdev-add', { driver: 'raw', 'node-name': 'x', file: 'nothere' }, 'GenericError', "Cannot find device='nothere' nor node-name='nothere'");
    await expectError(c, 'blockdev-add', { driver: 'null-co', 'node-name': 'x', 'read-only': 'yes' }, 'GenericError', "Invalid parameter type for 'read-only', expected: boolean");
    await expectError(c, 'blockdev-add', { driver: 'null-co', 'node-name': '1bad' }, 'GenericError', "Invalid node-name: '1bad'");
    await expectError(
      c,
      'blockdev-add',
      { driver: 'raw', 'node-name': 'x', file: { driver: 'file', filename: join(dir, 'missing') } },
      'GenericError',
      `Could not open '${join(dir, 'missing')}': No such file or directory`,
    );
    // nothing half-made is left behind
    assert.deepEqual(await c.execute('query-named-block-nodes'), []);
  });

  await t.test('query-named-block-nodes reports QEMU BlockDeviceInfo fields', async () => {
    await c.execute('blockdev-add', { driver: 'file', 'node-name': 'f0', filename: img });
    await c.execute('blockdev-add', { driver: 'raw', 'node-name': 'r0', file: 'f0', 'detect-zeroes': 'on' });
    await expectError(c, 'blockdev-add', { driver: 'null-co', 'node-name': 'r0' }, 'GenericError', "Duplicate nodes with node-name='r0'");
    const nodes = (await c.execute('query-named-block-nodes', { flat: true })) as NodeInfo[];
    assert.deepEqual(
      nodes.map((n) => n['node-name']),
      ['r0', 'f0'],
    );
    const r0 = nodes[0]!;
    assert.deepEqual(r0, {
      file: img,
      'node-name': 'r0',
      ro: false,
      drv: 'raw',
      backing_file_depth: 0,
      encrypted: false,
      detect_zeroes: 'on',
      bps: 0,
      bps_rd: 0,
      bps_wr: 0,
      iops: 0,
      iops_rd: 0,
      iops_wr: 0,
      image: { ...r0.image, 'virtual-size': 1024 * 1024, filename: img, format: 'raw' },
      cache: { writeback: true, direct: false, 'no-flush': false },
      write_threshold: 0,
    });
    assert.equal(nodes[1]!.drv, 'file');
    await expectError(c, 'query-named-block-nodes', { flat: 'yes' }, 'GenericError', "Invalid parameter type for 'flat', expected: boolean");
  });

  await t.test('blockdev-reopen switches read-only and refuses other changes', async () => {
    await c.execute('blockdev-reopen', { options: [{ driver: 'raw', 'node-name': 'r0', file: 'f0', 'detect-zeroes': 'on', 'read-only': true }] });
    let nodes = (await c.execute('query-named-block-nodes')) as NodeInfo[];
    assert.equal(nodes.find((n) => n['node-name'] === 'r0')!.ro, true);
    await c.execute('blockdev-reopen', { options: [{ driver: 'raw', 'node-name': 'r0', file: 'f0', 'detect-zeroes': 'on' }] });
    nodes = (await c.execute('query-named-block-nodes')) as NodeInfo[];
    assert.equal(nodes.find((n) => n['node-name'] === 'r0')!.ro, false);
    await expectError(c, 'blockdev-reopen', { options: [{ driver: 'raw', 'node-name': 'r0', file: 'f0', 'detect-zeroes': 'off' }] }, 'GenericError', "Cannot change the option 'detect-zeroes'");
    await expectError(c, 'blockdev-reopen', { options: [{ driver: 'raw', 'node-name': 'r0', file: 'f0' }] }, 'GenericError', "Option 'detect-zeroes' cannot be reset to its default value");
    await expectError(c, 'blockdev-reopen', { options: [{ driver: 'null-co' }] }, 'GenericError', 'node-name not specified');
    await expectError(c, 'blockdev-reopen', { options: [{ driver: 'null-co', 'node-name': 'zz' }] }, 'GenericError', "Failed to find node with node-name='zz'");
    await expectError(c, 'blockdev-reopen', { options: [{ driver: 'file', 'node-name': 'r0' }] }, 'GenericError', "Cannot change the option 'driver'");
  });

  await t.test('x-blockdev-change answers with QEMU messages', async () => {
    await expectError(c, 'x-blockdev-change', { parent: 'x' }, 'GenericError', "Cannot find device='x' nor node-name='x'");
    await expectError(c, 'x-blockdev-change', { parent: 'r0', child: 'file', node: 'f0' }, 'GenericError', 'The parameters child and node are in conflict');
    await expectError(c, 'x-blockdev-change', { parent: 'r0' }, 'GenericError', 'Either child or node must be specified');
    await expectError(c, 'x-blockdev-change', { parent: 'r0', child: 'foo' }, 'GenericError', "Node 'r0' does not have child 'foo'");
    await expectError(c, 'x-blockdev-change', { parent: 'r0', node: 'f0' }, 'GenericError', 'The node r0 does not support adding a child');
  });

  await t.test('blockdev-del refuses nodes in use and unknown names', async () => {
    await expectError(c, 'blockdev-del', { 'node-name': 'x' }, 'GenericError', "Failed to find node with node-name='x'");
    await expectError(c, 'blockdev-del', { 'node-name': 'f0' }, 'GenericError', 'Block device f0 is in use');
    await c.execute('blockdev-del', { 'node-name': 'r0' });
    await c.execute('blockdev-del', { 'node-name': 'f0' });
    assert.deepEqual(await c.execute('query-named-block-nodes'), []);
  });

  await t.test('human-monitor-command: drive_add -n, info block -n, drive_del, unknown commands', async () => {
    assert.equal(await c.execute('human-monitor-command', { 'command-line': `drive_add -n buddy driver=raw,node-name=d1,file.driver=file,file.filename=${img}` }), '');
    assert.equal(
      await c.execute('human-monitor-command', { 'command-line': 'drive_add -n buddy driver=raw,node-name=d1,file.driver=null-co' }),
      "Duplicate nodes with node-name='d1'\r\n",
    );
    assert.equal(await c.execute('human-monitor-command', { 'command-line': 'drive_add -n buddy driver=null-co' }), "'node-name' needs to be specified\r\n");
    assert.equal(await c.execute('human-monitor-command', { 'command-line': 'info block -n d1' }), `d1: ${img} (raw)\r\n    Cache mode:       writeback\r\n`);
    assert.equal(await c.execute('human-monitor-command', { 'command-line': 'foo' }), "unknown command: 'foo'\r\n");
    assert.equal(await c.execute('human-monitor-command', { 'command-line': 'qemu-io -d d1 "read 0 512"' }), "Error: Device 'd1' not found\r\n");
    assert.equal(await c.execute('human-monitor-command', { 'command-line': 'qemu-io nope "read 0 512"' }), "Error: Cannot find device='' nor node-name='nope'\r\n");
    assert.equal(await c.execute('human-monitor-command', { 'command-line': 'drive_del d9' }), "Device 'd9' not found\r\n");
    assert.equal(await c.execute('human-monitor-command', { 'command-line': 'drive_del d1' }), '');
    assert.deepEqual(await c.execute('query-named-block-nodes'), []);
  });
});

test('object-add and object-del', async (t) => {
  if (!requireTool(t, 'openssl', ['version'])) return;
  const dir = tempDir(t);
  const tls = makeTlsDirs(dir);
  const d = await startDaemon(t, dir, []);
  const c = await d.client();
  await c.execute('object-add', { 'qom-type': 'tls-creds-x509', id: 'tls0', dir: tls.server, endpoint: 'server', 'verify-peer': true });
  await expectError(c, 'object-add', { 'qom-type': 'tls-creds-x509', id: 'tls0', dir: tls.server, endpoint: 'server' }, 'GenericError', "attempt to add duplicate property 'tls0' to object (type 'container')");
  await expectError(c, 'object-add', { 'qom-type': 'tls-creds-x509', id: 't1', dir: '/nonexist', endpoint: 'server' }, 'GenericError', 'Unable to access credentials /nonexist/ca-cert.pem: No such file or directory');
  await expectError(c, 'object-add', { 'qom-type': 'tls-creds-x509', id: 't1', endpoint: 'server' }, 'GenericError', "Missing 'dir' property value");
  await expectError(c, 'object-add', { 'qom-type': 'tls-creds-x509', id: 't1', dir: '/tmp', endpoint: 'serverx' }, 'GenericError', "Parameter 'endpoint' does not accept value 'serverx'");
  await expectError(c, 'object-add', { 'qom-type': 'foo', id: 't1' }, 'GenericError', "Parameter 'qom-type' does not accept value 'foo'");
  await c.execute('object-add', { 'qom-type': 'secret', id: 's0', data: 'abc' });
  await c.execute('object-del', { id: 's0' });
  await c.execute('object-del', { id: 'tls0' });
  await expectError(c, 'object-del', { id: 'tls0' }, 'GenericError', "object 'tls0' not found");
});
