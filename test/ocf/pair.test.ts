// The agent in pair mode, driven as Pacemaker drives a promotable clone on two nodes (here two
// state and data directories on this machine, the daemons on loopback ports): start makes each
// node a `lockstep pair host`, promote on one starts the pair's supervisor there, an NBD client
// writes through it, a checkpoint, then the promoted node dies (its daemon and supervisor
// SIGKILLed): monitor says 9 there, a record that says inconsistent is refused, and promote on
// the other node is the takeover, which serves exactly the disk as it was at the checkpoint.
// The old node comes back as a secondary and the survivor, demoted and promoted again, runs
// the pair with it (the old node's disk resynced from the survivor's generation).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { NbdClient } from '../../src/nbd/client/client.js';
import { QmpClient } from '../../src/qmp/client.js';
import { tempDir } from '../helpers/graph.js';
import { REPO_ROOT, LOCKSTEP_BIN, requireTool } from '../helpers/processes.js';
import type { DiskMeta } from '../../src/pair/generations.js';

const AGENT = join(REPO_ROOT, 'ocf', 'lockstep');
const OCF_ROOT = '/usr/lib/ocf';
const OCF = { SUCCESS: 0, ERR_GENERIC: 1, NOT_RUNNING: 7, RUNNING_PROMOTED: 8, FAILED_PROMOTED: 9 };
const MiB = 1024 * 1024;
const SIZE = 16 * MiB;

const usable = ['ocf-tester', 'crm_attribute', 'setsid'].every((tool) => requireTool(tool));
const skip = usable ? false : 'needs resource-agents (ocf-shellfuncs), pacemaker-cli-utils and setsid';

interface Node {
  name: 'n1' | 'n2';
  dataDir: string;
  stateDir: string;
}

// ports of this run: another test file may use fixed ones
// below the kernel's ephemeral range (32768+), disjoint from the other tests' fixed ports
const BASE = 20000 + (process.pid % 300) * 10;
const ADDR = { n1: `127.0.0.1:${BASE}:${BASE + 1}`, n2: `127.0.0.1:${BASE + 2}:${BASE + 3}` };

function agent(node: Node, peer: Node, action: string, cib: string): { rc: number; out: string } {
  const r = spawnSync(AGENT, [action], {
    encoding: 'utf8',
    env: {
      ...process.env,
      OCF_ROOT,
      OCF_RESOURCE_INSTANCE: 'lockstep',
      OCF_RESKEY_nodes: `n1=${ADDR.n1} n2=${ADDR.n2}`,
      OCF_RESKEY_node: node.name,
      OCF_RESKEY_CRM_meta_on_node: node.name,
      OCF_RESKEY_state_dir: node.stateDir,
      OCF_RESKEY_data_dir: node.dataDir,
      OCF_RESKEY_peer_data_dir: peer.dataDir,
      OCF_RESKEY_binary: LOCKSTEP_BIN,
      OCF_RESKEY_size: String(SIZE),
      // on demand only: the test's checkpoint is the one the takeover goes back to
      OCF_RESKEY_checkpoint_interval: '0',
      OCF_RESKEY_lease: '400ms',
      // passed on to the pair's supervisor (checked on the primary's daemon below)
      OCF_RESKEY_on_lease_expiry: 'io-error',
      CIB_file: cib,
    },
  });
  return { rc: r.status ?? -1, out: `${r.stdout}${r.stderr}` };
}

function score(cib: string, node: Node): string | undefined {
  const id = node.name === 'n1' ? 1 : 2;
  return new RegExp(`id="status-${id}-master-lockstep" name="master-lockstep" value="(\\d+)"`).exec(readFileSync(cib, 'utf8'))?.[1];
}

const CIB = `<cib crm_feature_set="3.16.1" validate-with="pacemaker-3.9" have-quorum="1" epoch="1" num_updates="0" admin_epoch="0">
  <configuration><crm_config/><nodes><node id="1" uname="n1"/><node id="2" uname="n2"/></nodes><resources/><constraints/></configuration>
  <status>
    <node_state id="1" uname="n1" in_ccm="true" crmd="online" join="member" expected="member"/>
    <node_state id="2" uname="n2" in_ccm="true" crmd="online" join="member" expected="member"/>
  </status>
</cib>
`;

function pidOf(file: string): number {
  return Number(readFileSync(file, 'utf8').trim());
}

function killAndWait(pid: number): void {
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    return;
  }
  spawnSync('sh', ['-c', `while kill -0 ${pid} 2>/dev/null; do sleep 0.05; done`]);
}

async function readAll(sock: string): Promise<Buffer> {
  const c = await NbdClient.connect({ address: { type: 'unix', path: sock }, exportName: 'disk' });
  try {
    return await c.read(0, SIZE);
  } finally {
    await c.disconnect();
  }
}

function firstDiff(a: Buffer, b: Buffer): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return -1;
}

test('pair mode: promote runs the pair, the primary node dies, promote on the secondary takes over at the last checkpoint', { skip, timeout: 150_000 }, async (t) => {
  const root = tempDir(t, 'ocf-pair-');
  const cib = join(root, 'cib.xml');
  writeFileSync(cib, CIB);
  const n1: Node = { name: 'n1', dataDir: join(root, 'n1', 'data'), stateDir: join(root, 'n1', 'state') };
  const n2: Node = { name: 'n2', dataDir: join(root, 'n2', 'data'), stateDir: join(root, 'n2', 'state') };
  for (const n of [n1, n2]) mkdirSync(n.dataDir, { recursive: true });
  const run = (n: Node, action: string) => agent(n, n === n1 ? n2 : n1, action, cib);
  t.after(() => {
    for (const n of [n1, n2]) {
      for (const f of ['supervisor.pid', 'daemon.pid']) if (existsSync(join(n.stateDir, f))) killAndWait(pidOf(join(n.stateDir, f)));
    }
  });

  // both nodes unpromoted: pair hosts, nothing served yet, no disk yet (score 10)
  for (const n of [n1, n2]) assert.equal(run(n, 'start').rc, OCF.SUCCESS);
  for (const n of [n1, n2]) assert.equal(run(n, 'monitor').rc, OCF.SUCCESS);
  assert.equal(score(cib, n1), '10');

  // promote n1: the supervisor starts there, creates both disks, syncs, serves
  const p = run(n1, 'promote');
  assert.equal(p.rc, OCF.SUCCESS, p.out);
  assert.equal(run(n1, 'promote').rc, OCF.SUCCESS, 'promote is idempotent');
  assert.equal(run(n1, 'monitor').rc, OCF.RUNNING_PROMOTED);
  assert.equal(run(n2, 'monitor').rc, OCF.SUCCESS);
  assert.equal(score(cib, n1), '10000', 'the pair primary');
  assert.equal(score(cib, n2), '1000', 'the live secondary');
  assert.ok(existsSync(join(n1.dataDir, 'primary.qcow2')) && existsSync(join(n2.dataDir, 'secondary.qcow2')));
  const [host, port] = ADDR.n1.split(':');
  const q = await QmpClient.open({ type: 'inet', host: host!, port: Number(port) });
  assert.equal(((await q.execute('x-query-block-lease')) as Array<{ 'on-expiry': string }>)[0]!['on-expiry'], 'io-error', 'on_lease_expiry reached the lease');
  q.close();

  const want = Buffer.alloc(SIZE);
  const c = await NbdClient.connect({ address: { type: 'unix', path: join(n1.stateDir, 'nbd.sock') }, exportName: 'disk' });
  const a = Buffer.alloc(MiB);
  for (let i = 0; i < a.length; i++) a[i] = (i * 131 + 7) & 0xff;
  await c.write(0, a);
  a.copy(want, 0);
  await c.write(5 * MiB + 4096, Buffer.alloc(64 * 1024, 0x5a));
  want.fill(0x5a, 5 * MiB + 4096, 5 * MiB + 4096 + 64 * 1024);
  const cp = spawnSync(process.execPath, [LOCKSTEP_BIN, 'pair', 'checkpoint', '--control', join(n1.stateDir, 'supervisor', 'pair.sock')], { encoding: 'utf8' });
  assert.equal(cp.status, 0, cp.stderr);
  // acknowledged after the checkpoint, never flushed: a failover goes back before it
  await c.write(0, Buffer.alloc(64 * 1024, 0x77));

  // the primary's node dies: its supervisor and daemon
  killAndWait(pidOf(join(n1.stateDir, 'supervisor.pid')));
  killAndWait(pidOf(join(n1.stateDir, 'daemon.pid')));
  c.destroy();
  assert.equal(run(n1, 'monitor').rc, OCF.FAILED_PROMOTED);

  // a record that says inconsistent is never promoted
  const metaPath = join(n2.dataDir, 'secondary.qcow2.meta.json');
  const good = readFileSync(metaPath, 'utf8');
  writeFileSync(metaPath, JSON.stringify({ ...(JSON.parse(good) as DiskMeta), consistent: false }));
  const refused = run(n2, 'promote');
  assert.equal(refused.rc, OCF.ERR_GENERIC);
  assert.match(refused.out, /refusing to promote: .* not consistent/);
  assert.equal(score(cib, n2), undefined, 'no score for an inconsistent disk');
  assert.equal(run(n2, 'monitor').rc, OCF.SUCCESS, 'still the live secondary, not serving');
  writeFileSync(metaPath, good);

  // promote n2: the takeover serves the disk as it was at the checkpoint
  const tk = run(n2, 'promote');
  assert.equal(tk.rc, OCF.SUCCESS, tk.out);
  assert.equal(run(n2, 'monitor').rc, OCF.RUNNING_PROMOTED);
  assert.equal(run(n2, 'promote').rc, OCF.SUCCESS, 'promote is idempotent');
  assert.equal(firstDiff(await readAll(join(n2.stateDir, 'nbd.sock')), want), -1);
  const m2 = JSON.parse(readFileSync(metaPath, 'utf8')) as DiskMeta;
  assert.equal(m2.role, 'primary');
  assert.equal(m2.consistent, true);
  assert.equal(m2.bitmap, (JSON.parse(good) as DiskMeta).current, 'a new generation counted from the pair one');
  assert.equal(score(cib, n2), '10000');

  // the old node comes back as a secondary; the survivor, demoted and promoted again, runs
  // the pair with it: the old node's disk resynced from the survivor
  assert.equal(run(n1, 'stop').rc, OCF.SUCCESS);
  assert.equal(run(n1, 'monitor').rc, OCF.NOT_RUNNING);
  assert.equal(run(n1, 'start').rc, OCF.SUCCESS);
  assert.ok(existsSync(join(n1.dataDir, 'secondary.qcow2')), 'the old primary disk is now named as a secondary');
  assert.equal(score(cib, n1), '100', 'the last primary on a fresh daemon never takes the role from the serving node');
  assert.equal(run(n2, 'demote').rc, OCF.SUCCESS);
  assert.equal(run(n2, 'monitor').rc, OCF.SUCCESS);
  const again = run(n2, 'promote');
  assert.equal(again.rc, OCF.SUCCESS, again.out);
  assert.equal(run(n2, 'monitor').rc, OCF.RUNNING_PROMOTED);
  assert.equal(run(n1, 'monitor').rc, OCF.SUCCESS);
  assert.equal(score(cib, n1), '1000');
  assert.equal(firstDiff(await readAll(join(n2.stateDir, 'nbd.sock')), want), -1);

  for (const n of [n1, n2]) assert.equal(run(n, 'stop').rc, OCF.SUCCESS);
  for (const n of [n1, n2]) assert.equal(run(n, 'monitor').rc, OCF.NOT_RUNNING);
});
