// Replication across implementations (issue 8): a QEMU 7.2 primary into a lockstep
// secondary, a lockstep primary into a QEMU secondary, and lockstep on both sides, on
// identical inputs. Both sides are separate processes driven through QMP only (HMP qemu-io
// for I/O). Images for a lockstep side are made by qemu-img and for a QEMU side by
// `lockstep img`, so the image formats are exchanged too.
//
// Checked byte for byte: after a checkpoint the secondary disk equals the primary disk;
// after failover it holds the last checkpoint plus the secondary's own writes.

import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { LOCKSTEP_BIN, requireTool, startLockstep, startQemu, type Proc } from '../helpers/processes.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;
type Kind = 'qemu' | 'lockstep';

let root = '';
// below the kernel's ephemeral range (32768+), disjoint from the other tests' fixed ports
let nextPort = 29000 + (process.pid % 300) * 10;
const haveTools = requireTool('qemu-system-x86_64') && requireTool('qemu-img');

before(() => {
  root = mkdtempSync(join(tmpdir(), 'lockstep-interop-repl-'));
});
after(() => {
  if (root) rmSync(root, { recursive: true, force: true });
});

function run(cmd: string, args: string[]): { status: number | null; out: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  return { status: r.status, out: `${r.stdout}${r.stderr}` };
}

/** Images for a side: made by the other implementation's tool. */
function createImage(forKind: Kind, file: string): void {
  const r = forKind === 'lockstep'
    ? run('qemu-img', ['create', '-q', '-f', 'qcow2', file, String(SIZE)])
    : run(process.execPath, [LOCKSTEP_BIN, 'img', 'create', '-q', '-f', 'qcow2', file, String(SIZE)]);
  assert.equal(r.status, 0, r.out);
}

interface Paths {
  dir: string;
  plocal: string;
  sdisk: string;
  active: string;
  hidden: string;
}

function paths(name: string, primary: Kind, secondary: Kind): Paths {
  const dir = join(root, name);
  spawnSync('mkdir', ['-p', dir]);
  const p = { dir, plocal: join(dir, 'plocal.qcow2'), sdisk: join(dir, 'sdisk.qcow2'), active: join(dir, 'active.qcow2'), hidden: join(dir, 'hidden.qcow2') };
  createImage(primary, p.plocal);
  for (const f of [p.sdisk, p.active, p.hidden]) createImage(secondary, f);
  return p;
}

async function startSecondary(kind: Kind, p: Paths, port: number): Promise<Proc> {
  const proc =
    kind === 'qemu'
      ? await startQemu(p.dir, 'secondary', [
          '-drive', `if=none,id=parent0,driver=qcow2,file.filename=${p.sdisk}`,
          '-drive',
          `if=none,id=childs0,driver=replication,mode=secondary,top-id=childs0,file.driver=qcow2,file.file.filename=${p.active},` +
            `file.backing.driver=qcow2,file.backing.file.filename=${p.hidden},file.backing.backing=parent0`,
        ])
      : await startLockstep(p.dir, 'secondary', [
          '--blockdev', `driver=qcow2,node-name=parent0,file.driver=file,file.filename=${p.sdisk}`,
          '--blockdev',
          `driver=replication,node-name=childs0,mode=secondary,top-id=childs0,file.driver=qcow2,file.file.driver=file,file.file.filename=${p.active},` +
            `file.backing.driver=qcow2,file.backing.file.driver=file,file.backing.file.filename=${p.hidden},file.backing.backing=parent0`,
        ]);
  await proc.qmp.execute('nbd-server-start', { addr: { type: 'inet', data: { host: '127.0.0.1', port: String(port) } } });
  await proc.qmp.execute('nbd-server-add', { device: 'parent0', writable: true });
  return proc;
}

async function startPrimary(kind: Kind, p: Paths, port: number): Promise<Proc> {
  const proc =
    kind === 'qemu'
      ? await startQemu(p.dir, 'primary', [
          '-drive', `if=none,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,children.0.driver=qcow2,children.0.file.filename=${p.plocal}`,
        ])
      : await startLockstep(p.dir, 'primary', [
          '--blockdev',
          `driver=quorum,node-name=colo-disk0,read-pattern=fifo,vote-threshold=1,children.0.driver=qcow2,children.0.file.driver=file,children.0.file.filename=${p.plocal}`,
        ]);
  // the primary's disk is exported read-only so the test can compare it with the secondary's
  await proc.qmp.execute('nbd-server-start', { addr: { type: 'inet', data: { host: '127.0.0.1', port: String(port) } } });
  await proc.qmp.execute('nbd-server-add', { device: 'colo-disk0', writable: false });
  return proc;
}

async function initialSync(primary: Proc, secondaryPort: number): Promise<void> {
  await primary.qmp.execute('drive-mirror', {
    'job-id': 'resync',
    device: 'colo-disk0',
    target: `nbd://127.0.0.1:${secondaryPort}/parent0`,
    mode: 'existing',
    format: 'raw',
    sync: 'full',
  });
  await primary.qmp.waitEvent('BLOCK_JOB_READY', (d) => d.device === 'resync', 60_000);
  await primary.qmp.execute('block-job-cancel', { device: 'resync' });
  await primary.qmp.waitEvent('BLOCK_JOB_COMPLETED', (d) => d.device === 'resync', 60_000);
}

async function startReplication(primary: Proc, secondary: Proc, secondaryPort: number): Promise<void> {
  await secondary.qmp.execute('xen-set-replication', { enable: true, primary: false });
  await primary.qmp.execute('blockdev-add', {
    driver: 'replication',
    'node-name': 'replication0',
    mode: 'primary',
    file: { driver: 'nbd', server: { type: 'inet', host: '127.0.0.1', port: String(secondaryPort) }, export: 'parent0' },
  });
  await primary.qmp.execute('x-blockdev-change', { parent: 'colo-disk0', node: 'replication0' });
  await primary.qmp.execute('xen-set-replication', { enable: true, primary: true });
}

async function checkpoint(primary: Proc, secondary: Proc): Promise<void> {
  await secondary.qmp.execute('xen-colo-do-checkpoint');
  await primary.qmp.execute('xen-colo-do-checkpoint');
}

/** Waits until the failover commit has ended: the active image has left the graph. */
async function waitCommit(secondary: Proc, activeFile: string): Promise<void> {
  for (let i = 0; i < 600; i++) {
    const nodes = (await secondary.qmp.execute('query-named-block-nodes')) as Array<{ file: string; image?: { filename: string } }>;
    if (!nodes.some((n) => n.file === activeFile || n.image?.filename === activeFile)) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error('failover commit did not end');
}

function sameContent(a: string, b: string, fa = 'raw', fb = 'raw'): { status: number | null; out: string } {
  return run('qemu-img', ['compare', '-U', '-f', fa, '-F', fb, a, b]);
}

function writeExpected(file: string, writes: Array<[number, number, number]>): void {
  const buf = Buffer.alloc(SIZE, 0x11);
  for (const [byte, offset, length] of writes) buf.fill(byte, offset, offset + length);
  writeFileSync(file, buf);
}

interface Outcome {
  sdisk: string;
}

async function scenario(primaryKind: Kind, secondaryKind: Kind, opts: { killPrimary?: boolean } = {}): Promise<Outcome> {
  const name = `${primaryKind}-to-${secondaryKind}${opts.killPrimary ? '-kill' : ''}`;
  const p = paths(name, primaryKind, secondaryKind);
  const sport = nextPort++;
  const pport = nextPort++;
  const secondary = await startSecondary(secondaryKind, p, sport);
  const primary = await startPrimary(primaryKind, p, pport);
  try {
    await primary.io('colo-disk0', `write -P 0x11 0 ${SIZE}`);
    await initialSync(primary, sport);
    await startReplication(primary, secondary, sport);

    // before the checkpoint
    await primary.io('colo-disk0', 'write -P 0x22 0 4M');
    await primary.io('colo-disk0', 'write -P 0x23 10M 64k');
    await secondary.io('childs0', 'write -P 0x33 20M 2M');
    await checkpoint(primary, secondary);
    const cmp = sameContent(`nbd://127.0.0.1:${pport}/colo-disk0`, `nbd://127.0.0.1:${sport}/parent0`);
    assert.equal(cmp.status, 0, `after the checkpoint the disks differ: ${cmp.out}`);

    // after the checkpoint: both sides write, partly to the same range
    await secondary.io('childs0', 'write -P 0x55 31232k 1M');
    if (opts.killPrimary) {
      const burst = [];
      for (let i = 0; i < 16; i++) burst.push(primary.io('colo-disk0', `write -P 0x66 ${40 + i}M 1M`).catch(() => ''));
      await new Promise((r) => setTimeout(r, 30));
      await primary.kill();
      await Promise.all(burst);
    } else {
      await primary.io('colo-disk0', 'write -P 0x44 30M 1M');
    }

    // failover on the secondary
    await secondary.qmp.execute('xen-set-replication', { enable: false, primary: false, failover: true });
    await waitCommit(secondary, p.active);
    if (!opts.killPrimary) {
      // the primary's own disk holds all its writes
      const pexp = join(p.dir, 'primary-expected.raw');
      writeExpected(pexp, [[0x22, 0, 4 * MiB], [0x23, 10 * MiB, 64 * 1024], [0x44, 30 * MiB, MiB]]);
      const pc = sameContent(`nbd://127.0.0.1:${pport}/colo-disk0`, pexp);
      assert.equal(pc.status, 0, `primary disk: ${pc.out}`);
    }
  } finally {
    await primary.quit();
    await secondary.quit();
  }
  // the last checkpoint plus the secondary's own writes since
  const expected = join(p.dir, 'secondary-expected.raw');
  writeExpected(expected, [[0x22, 0, 4 * MiB], [0x23, 10 * MiB, 64 * 1024], [0x55, 30 * MiB + 512 * 1024, MiB]]);
  const c = sameContent(p.sdisk, expected, 'qcow2', 'raw');
  assert.equal(c.status, 0, `secondary disk after failover: ${c.out}`);
  const check = run('qemu-img', ['check', p.sdisk]);
  assert.equal(check.status, 0, check.out);
  return { sdisk: p.sdisk };
}

describe('replication between QEMU 7.2 and lockstep', { skip: !haveTools && 'qemu-system-x86_64 is not installed', timeout: 120_000 }, () => {
  const results: Record<string, Outcome> = {};

  test('QEMU primary -> lockstep secondary', async () => {
    results.q2l = await scenario('qemu', 'lockstep');
  });

  test('lockstep primary -> QEMU secondary', async () => {
    results.l2q = await scenario('lockstep', 'qemu');
  });

  test('lockstep primary -> lockstep secondary', async () => {
    results.l2l = await scenario('lockstep', 'lockstep');
  });

  test('the three pairings produce identical secondary disks', () => {
    assert.ok(results.q2l && results.l2q && results.l2l, 'all three pairings ran');
    for (const [a, b] of [[results.q2l, results.l2q], [results.q2l, results.l2l]] as const) {
      const c = sameContent(a.sdisk, b.sdisk, 'qcow2', 'qcow2');
      assert.equal(c.status, 0, c.out);
    }
  });

  test('QEMU primary killed mid-burst: the lockstep secondary holds the checkpoint plus its own writes', async () => {
    await scenario('qemu', 'lockstep', { killPrimary: true });
  });

  test('lockstep primary killed mid-burst: the QEMU secondary holds the checkpoint plus its own writes', async () => {
    await scenario('lockstep', 'qemu', { killPrimary: true });
  });
});
