// The daemon's NBD exports and NBD-facing jobs, checked with QEMU and libnbd tools:
// a qcow2 export read by qemu-img and nbdinfo, exports managed over QMP, the loopback rule,
// drive-mirror to an nbd:// target in another daemon, block-commit of a qcow2 chain.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { createServer } from 'node:net';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from '../helpers/graph.js';
import { buildHas, startDaemon } from '../helpers/daemon.js';
import { requireTool } from '../helpers/tls.js';

async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', () => r()));
  const port = (s.address() as { port: number }).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

function run(cmd: string, args: string[]): string {
  return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

function tools(t: { skip(msg: string): void }): boolean {
  return requireTool(t, 'qemu-img') && requireTool(t, 'qemu-io') && requireTool(t, 'nbdinfo');
}

let wired: Promise<string | null> | null = null;
/** null when the NBD server, jobs, qemu-io and qcow2 are wired; else what is missing. */
function missingParts(t: { after(fn: () => unknown): void }, dir: string): Promise<string | null> {
  wired ??= (async () => {
    const d = await startDaemon(t, dir, []);
    const c = await d.client();
    const missing: string[] = [];
    for (const part of ['nbd', 'jobs', 'qemu-io'] as const) if (!(await buildHas(c, part, dir))) missing.push(part);
    const q = await c.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'probe', file: { driver: 'null-co' } }).then(
      () => true,
      (e: { desc?: string }) => e.desc !== "Parameter 'driver' does not accept value 'qcow2'",
    );
    if (!q) missing.push('qcow2');
    await d.stop();
    return missing.length ? `not wired into this build: ${missing.join(', ')} (src/daemon/wiring.ts)` : null;
  })();
  return wired;
}

async function partsReady(t: { skip(msg: string): void; after(fn: () => unknown): void }, dir: string): Promise<boolean> {
  if (!tools(t)) return false;
  const missing = await missingParts(t, dir);
  if (missing) t.skip(missing);
  return missing === null;
}

test('a qcow2 export is read by qemu-img and nbdinfo, written by qemu-io, seen by the monitor', async (t) => {
  const dir = tempDir(t);
  if (!(await partsReady(t, dir))) return;
  const img = join(dir, 'disk.qcow2');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '8M']);
  run('qemu-io', ['-c', 'write -P 0x5a 0 1M', '-c', 'write -P 0xa5 4M 64k', img]);
  const sock = join(dir, 'nbd.sock');
  const d = await startDaemon(t, dir, [
    '--blockdev',
    `driver=qcow2,node-name=disk,file.driver=file,file.filename=${img}`,
    '--nbd-server',
    `addr.type=unix,addr.path=${sock}`,
    '--export',
    'nbd,id=exp0,node-name=disk,name=vol,writable=on',
  ]);
  const uri = `nbd+unix:///vol?socket=${sock}`;
  const info = JSON.parse(run('nbdinfo', ['--json', uri])) as { exports: Array<{ 'export-name': string; 'export-size': number; is_read_only: boolean }> };
  assert.equal(info.exports[0]!['export-name'], 'vol');
  assert.equal(info.exports[0]!['export-size'], 8 * 1024 * 1024);
  assert.equal(info.exports[0]!.is_read_only, false);
  // lockstep's export and the qcow2 file (read with force-share) hold the same bytes
  const cmp = spawnSync('qemu-img', ['compare', '-U', '-f', 'raw', '-F', 'qcow2', uri, img], { encoding: 'utf8' });
  assert.equal(cmp.status, 0, cmp.stdout + cmp.stderr);
  assert.equal(cmp.stdout, 'Images are identical.\n');
  run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 2M 128k', uri]);
  const c = await d.client();
  assert.equal(await c.execute('human-monitor-command', { 'command-line': 'qemu-io disk "read -q -P 0x33 2M 128k"' }), '');
  assert.match(
    (await c.execute('human-monitor-command', { 'command-line': 'qemu-io disk "read -P 0x5a 2M 512"' })) as string,
    /^Pattern verification failed at offset 2097152, 512 bytes\r\n/,
  );
  assert.deepEqual(await c.execute('query-block-exports'), [{ type: 'nbd', id: 'exp0', 'node-name': 'disk', 'shutting-down': false }]);
  const nodes = (await c.execute('query-named-block-nodes')) as Array<Record<string, unknown>>;
  const disk = nodes.find((n) => n['node-name'] === 'disk')!;
  assert.equal(disk.drv, 'qcow2');
  assert.equal(disk.file, img);
  assert.equal((disk.image as Record<string, unknown>)['virtual-size'], 8 * 1024 * 1024);
  // graceful shutdown with the export in use leaves a clean image
  d.proc.kill('SIGTERM');
  assert.equal(await d.exited, 0);
  const check = spawnSync('qemu-img', ['check', img], { encoding: 'utf8' });
  assert.equal(check.status, 0, check.stdout + check.stderr);
  run('qemu-io', ['-c', 'read -P 0x33 2M 128k', '-c', 'read -P 0xa5 4M 64k', img]);
});

test('exports managed over QMP: start, add, BLOCK_EXPORT_DELETED, stop, and the loopback rule', async (t) => {
  const dir = tempDir(t);
  if (!(await partsReady(t, dir))) return;
  const d = await startDaemon(t, dir, ['--blockdev', 'driver=memory,node-name=mem,size=1M']);
  const c = await d.client();
  const port = await freePort();
  await c.execute('nbd-server-start', { addr: { type: 'inet', data: { host: '127.0.0.1', port: String(port) } } });
  await assert.rejects(c.execute('nbd-server-start', { addr: { type: 'inet', data: { host: '127.0.0.1', port: String(port) } } }), {
    desc: 'NBD server already running',
  });
  await c.execute('nbd-server-add', { device: 'mem', name: 'm', writable: true });
  await c.execute('block-export-add', { type: 'nbd', id: 'ro', 'node-name': 'mem', name: 'readonly' });
  await assert.rejects(c.execute('nbd-server-add', { device: 'mem', name: 'm' }), { desc: "Block export id 'm' is already in use" });
  run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 4k', `nbd://127.0.0.1:${port}/m`]);
  const ro = spawnSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x22 0 4k', `nbd://127.0.0.1:${port}/readonly`], { encoding: 'utf8' });
  assert.match(ro.stdout + ro.stderr, /read-only|Operation not permitted|Permission denied/i);
  run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x11 0 4k', `nbd://127.0.0.1:${port}/readonly`]);
  await c.execute('block-export-del', { id: 'ro' });
  const ev = await c.waitEvent('BLOCK_EXPORT_DELETED');
  assert.deepEqual(ev.data, { id: 'ro' });
  assert.notEqual(spawnSync('nbdinfo', [`nbd://127.0.0.1:${port}/readonly`]).status, 0);
  await c.execute('nbd-server-stop');
  await c.waitEvent('BLOCK_EXPORT_DELETED', (x) => x.id === 'm');
  assert.deepEqual(await c.execute('query-block-exports'), []);
  assert.notEqual(spawnSync('nbdinfo', [`nbd://127.0.0.1:${port}/m`]).status, 0);

  // a plain server on a non-loopback address serves read-only exports only
  const port2 = await freePort();
  await c.execute('nbd-server-start', { addr: { type: 'inet', data: { host: '0.0.0.0', port: String(port2) } } });
  await assert.rejects(c.execute('nbd-server-add', { device: 'mem', name: 'w', writable: true }), {
    desc: "Refusing writable export 'w': the NBD server listens on a non-loopback address without TLS (use tls-creds, a loopback address, or --insecure)",
  });
  await c.execute('nbd-server-add', { device: 'mem', name: 'r' });
  run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x11 0 4k', `nbd://127.0.0.1:${port2}/r`]);
  assert.ok(d.logs().some((l) => l.level === 'warn' && String(l.msg).includes('only read-only exports are allowed')));
});

test('drive-mirror to an nbd:// export of another daemon, then cancel after READY leaves the target equal', async (t) => {
  const dir = tempDir(t);
  if (!(await partsReady(t, dir))) return;
  const src = join(dir, 'src.qcow2');
  const tgt = join(dir, 'tgt.raw');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', src, '16M']);
  run('qemu-io', ['-c', 'write -P 0x61 0 3M', '-c', 'write -z 8M 1M', '-c', 'write -P 0x62 15M 1M', src]);
  run('qemu-img', ['create', '-q', '-f', 'raw', tgt, '16M']);
  run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xee 0 16M', tgt]); // the target starts with other data
  const port = await freePort();
  const secondary = await startDaemon(t, join(dir), [
    '--blockdev',
    `driver=raw,node-name=parent0,file.driver=file,file.filename=${tgt}`,
    '--nbd-server',
    `addr.type=inet,addr.host=127.0.0.1,addr.port=${port}`,
    '--export',
    'nbd,id=e,node-name=parent0,name=secondary-disk,writable=on',
  ], { monitor: false });
  const primaryDir = join(dir, 'p');
  execFileSync('mkdir', ['-p', primaryDir]);
  const primary = await startDaemon(t, primaryDir, ['--blockdev', `driver=qcow2,node-name=colo-disk0,file.driver=file,file.filename=${src}`]);
  const c = await primary.client();
  await c.execute('drive-mirror', {
    device: 'colo-disk0',
    'job-id': 'resync',
    target: `nbd://127.0.0.1:${port}/secondary-disk`,
    mode: 'existing',
    format: 'raw',
    sync: 'full',
  });
  await c.waitEvent('BLOCK_JOB_READY', (x) => x.device === 'resync');
  assert.equal(await c.execute('human-monitor-command', { 'command-line': 'qemu-io colo-disk0 "write -q -P 0x63 5M 64k"' }), '');
  await c.execute('block-job-cancel', { device: 'resync' });
  await c.waitEvent('BLOCK_JOB_COMPLETED', (x) => x.device === 'resync');
  // the implicit target node is gone once the job ended
  const nodes = (await c.execute('query-named-block-nodes')) as Array<Record<string, unknown>>;
  assert.deepEqual(nodes.map((n) => n.drv).sort(), ['file', 'qcow2']);
  primary.proc.kill('SIGTERM');
  assert.equal(await primary.exited, 0);
  secondary.proc.kill('SIGTERM');
  assert.equal(await secondary.exited, 0);
  const cmp = spawnSync('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', src, tgt], { encoding: 'utf8' });
  assert.equal(cmp.stdout, 'Images are identical.\n', cmp.stderr);
  const bytes = readFileSync(tgt);
  assert.equal(bytes[5 * 1024 * 1024], 0x63);
  assert.equal(bytes[8 * 1024 * 1024], 0);
});

test('block-commit of a qcow2 overlay into its base: READY, complete, data in the base', async (t) => {
  const dir = tempDir(t);
  if (!(await partsReady(t, dir))) return;
  const base = join(dir, 'base.qcow2');
  const top = join(dir, 'top.qcow2');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', base, '4M']);
  run('qemu-io', ['-c', 'write -P 0x01 0 4M', base]);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
  run('qemu-io', ['-c', 'write -P 0x02 1M 1M', top]);
  const d = await startDaemon(t, dir, [
    '--blockdev',
    `driver=qcow2,node-name=base,file.driver=file,file.filename=${base}`,
    '--blockdev',
    `driver=qcow2,node-name=top,file.driver=file,file.filename=${top},backing=base`,
  ]);
  const c = await d.client();
  await assert.rejects(c.execute('block-commit', { device: 'nope' }), { errorClass: 'DeviceNotFound', desc: "Device 'nope' not found" });
  await assert.rejects(c.execute('block-commit', { device: 'base', 'job-id': 'x' }), { desc: 'Need a root block node' });
  await c.execute('block-commit', { device: 'top', 'job-id': 'commit0' });
  const ready = await c.waitEvent('BLOCK_JOB_READY', (x) => x.device === 'commit0');
  assert.equal(ready.data!.type, 'commit');
  await c.execute('block-job-complete', { device: 'commit0' });
  await c.waitEvent('BLOCK_JOB_COMPLETED', (x) => x.device === 'commit0');
  d.proc.kill('SIGTERM');
  assert.equal(await d.exited, 0);
  run('qemu-io', ['-c', 'read -P 0x01 0 1M', '-c', 'read -P 0x02 1M 1M', '-c', 'read -P 0x01 2M 2M', base]);
  const check = spawnSync('qemu-img', ['check', base], { encoding: 'utf8' });
  assert.equal(check.status, 0, check.stdout);
});
