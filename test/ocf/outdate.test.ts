// Outdating the peer (DRBD's Outdated disk state and crm-fence-peer), with the agent in pair
// mode on two nodes (two state and data directories here, the daemons on loopback ports): the
// secondary's daemon is cut off (SIGSTOP: it answers no one), the primary goes on alone and a
// write is acknowledged on its disk only. Its record notes the peer it could not outdate, its
// agent's monitor sets a location constraint against promoting the peer, and the peer's
// promote is refused. Once the peer answers again the supervisor marks its record outdated: a
// `lockstep pair takeover` there is refused, the constraint goes, and after the peer restarts
// the pair resyncs from the primary: a later takeover serves the write made alone.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { NbdClient } from '../../src/nbd/client/client.js';
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
// a range of its own (test/ocf/pair: 20000-39999, test/ocf/pair-tester: 60000-64999)
// below the kernel's ephemeral range (32768+), disjoint from the other tests' fixed ports
const BASE = 23000 + (process.pid % 300) * 10;
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
  <configuration><crm_config/><nodes><node id="1" uname="n1"/><node id="2" uname="n2"/></nodes><resources><clone id="lockstep-clone"><meta_attributes id="lockstep-clone-meta"><nvpair id="lockstep-clone-promotable" name="promotable" value="true"/></meta_attributes><primitive id="lockstep" class="ocf" provider="lockstep" type="lockstep"/></clone></resources><constraints/></configuration>
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


function lockstep(args: string[]): { rc: number; out: string } {
  const r = spawnSync(process.execPath, [LOCKSTEP_BIN, ...args], { encoding: 'utf8' });
  return { rc: r.status ?? -1, out: `${r.stdout}${r.stderr}` };
}

const record = (path: string): DiskMeta => JSON.parse(readFileSync(path, 'utf8')) as DiskMeta;

async function until(what: string, cond: () => boolean): Promise<void> {
  for (let i = 0; i < 600; i++) {
    if (cond()) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.fail(`never happened: ${what}`);
}

test('pair mode: a cut-off secondary is outdated; its promote and takeover are refused; it resyncs from the primary', { skip, timeout: 150_000 }, async (t) => {
  const root = tempDir(t, 'ocf-outdate-');
  const cib = join(root, 'cib.xml');
  writeFileSync(cib, CIB);
  const n1: Node = { name: 'n1', dataDir: join(root, 'n1', 'data'), stateDir: join(root, 'n1', 'state') };
  const n2: Node = { name: 'n2', dataDir: join(root, 'n2', 'data'), stateDir: join(root, 'n2', 'state') };
  for (const n of [n1, n2]) mkdirSync(n.dataDir, { recursive: true });
  const run = (n: Node, action: string) => agent(n, n === n1 ? n2 : n1, action, cib);
  const control = join(n1.stateDir, 'supervisor', 'pair.sock');
  let stopped: number | undefined;
  t.after(() => {
    if (stopped !== undefined) process.kill(stopped, 'SIGCONT');
    for (const n of [n1, n2]) {
      for (const f of ['supervisor.pid', 'daemon.pid']) if (existsSync(join(n.stateDir, f))) killAndWait(pidOf(join(n.stateDir, f)));
    }
  });

  for (const n of [n1, n2]) assert.equal(run(n, 'start').rc, OCF.SUCCESS);
  const p = run(n1, 'promote');
  assert.equal(p.rc, OCF.SUCCESS, p.out);
  const want = Buffer.alloc(SIZE);
  const c = await NbdClient.connect({ address: { type: 'unix', path: join(n1.stateDir, 'nbd.sock') }, exportName: 'disk' });
  t.after(() => c.destroy());
  await c.write(0, Buffer.alloc(256 * 1024, 0x11));
  want.fill(0x11, 0, 256 * 1024);
  const cp = lockstep(['pair', 'checkpoint', '--control', control]);
  assert.equal(cp.rc, 0, cp.out);
  // the flag written at the confirmed checkpoint: up to date at the pair's generation
  const secMeta = join(n2.dataDir, 'secondary.qcow2.meta.json');
  const priMeta = join(n1.dataDir, 'primary.qcow2.meta.json');
  const atCheckpoint = record(secMeta);
  assert.equal(atCheckpoint.upToDate, atCheckpoint.current);
  assert.ok(atCheckpoint.checkpoint >= 1);
  assert.equal(atCheckpoint.outdated, undefined);
  assert.equal(run(n2, 'monitor').rc, OCF.SUCCESS);
  assert.equal(score(cib, n2), '1000', 'a live secondary up to date by its record');

  // the secondary is cut off: the primary goes on alone, notes the peer it cannot outdate
  stopped = pidOf(join(n2.stateDir, 'daemon.pid'));
  process.kill(stopped, 'SIGSTOP');
  await until("the primary's record notes the peer it could not outdate", () => record(priMeta).peerNotOutdated === atCheckpoint.current);
  const alone = record(priMeta);
  assert.notEqual(alone.current, atCheckpoint.current, 'the primary went on in a new generation');
  assert.equal(alone.bitmap, atCheckpoint.current);
  // a write acknowledged (and flushed) on the primary's disk only
  await c.write(8 * MiB, Buffer.alloc(128 * 1024, 0x22));
  await c.flush();
  want.fill(0x22, 8 * MiB, 8 * MiB + 128 * 1024);
  assert.equal(run(n1, 'monitor').rc, OCF.RUNNING_PROMOTED);
  assert.match(readFileSync(cib, 'utf8'), /<rsc_location rsc="lockstep-clone" id="lockstep-fence-lockstep">[\s\S]*operation="ne" value="n1"/, 'crm-fence-peer: the peer kept from promotion');

  // the peer answers again: its own view is a live, up-to-date secondary, but the cluster says no
  process.kill(stopped, 'SIGCONT');
  stopped = undefined;
  const refused = run(n2, 'promote');
  assert.equal(refused.rc, OCF.ERR_GENERIC, refused.out);
  assert.match(refused.out, /refusing to promote: constraint lockstep-fence-lockstep says the other node went on alone/);
  assert.equal(run(n2, 'monitor').rc, OCF.SUCCESS, 'not serving');

  // the supervisor reaches the peer again and marks its record outdated (the peer still holds
  // the old pair's graph, so the re-protection itself stops there until the peer restarts)
  await until("the peer's record says outdated", () => {
    if (record(secMeta).outdated !== undefined) return true;
    lockstep(['pair', 'reprotect', '--control', control]);
    return record(secMeta).outdated !== undefined;
  });
  assert.equal(record(secMeta).outdated, alone.current);
  assert.equal(record(priMeta).peerNotOutdated, undefined, 'the note goes once the peer is marked');
  const tk = lockstep(['pair', 'takeover', '--qmp', `127.0.0.1:${BASE + 2}`, '--dir', n2.dataDir, '--nbd-socket', join(root, 'tk.sock'), '--lease', '400ms']);
  assert.equal(tk.rc, 1, tk.out);
  assert.match(tk.out, /lockstep pair takeover: refusing to take over: the generation record .* says the disk is outdated: the primary went on alone/);
  assert.equal(run(n2, 'monitor').rc, OCF.SUCCESS, 'the refused takeover changed nothing');
  assert.equal(score(cib, n2), undefined, 'no score for an outdated disk');
  assert.equal(run(n1, 'monitor').rc, OCF.RUNNING_PROMOTED);
  assert.doesNotMatch(readFileSync(cib, 'utf8'), /lockstep-fence-lockstep/, 'the constraint goes once the peer is marked');

  // the peer restarts: the pair resyncs from the primary (the outdated side is the target)
  assert.equal(run(n2, 'stop').rc, OCF.SUCCESS);
  assert.equal(run(n2, 'start').rc, OCF.SUCCESS);
  const rp = lockstep(['pair', 'reprotect', '--control', control]);
  assert.equal(rp.rc, 0, rp.out);
  const inStep = record(secMeta);
  assert.equal(inStep.current, record(priMeta).current);
  assert.equal(inStep.outdated, undefined);
  assert.equal(inStep.upToDate, inStep.current);
  assert.equal(lockstep(['pair', 'checkpoint', '--control', control]).rc, 0);

  // the primary's node dies: the takeover on the peer serves the write made alone
  c.destroy();
  killAndWait(pidOf(join(n1.stateDir, 'supervisor.pid')));
  killAndWait(pidOf(join(n1.stateDir, 'daemon.pid')));
  const promoted = run(n2, 'promote');
  assert.equal(promoted.rc, OCF.SUCCESS, promoted.out);
  assert.equal(firstDiff(await readAll(join(n2.stateDir, 'nbd.sock')), want), -1);
  for (const n of [n1, n2]) run(n, 'stop');
});
