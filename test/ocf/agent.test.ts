// The Pacemaker resource agent ocf/lockstep, run as Pacemaker runs it (OCF_RESKEY_* parameters,
// exit codes) against real `lockstep daemon` processes it starts itself: ocf-tester's OCF
// checks, monitor's codes through a promote and a crash, promote refused on an inconsistent
// disk, and the scheduler (crm_simulate on a CIB file) acting on the promotion scores that the
// agent wrote into that file through crm_attribute.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { REPO_ROOT, LOCKSTEP_BIN, requireTool } from '../helpers/processes.js';
import { justCreated, type DiskMeta } from '../../src/pair/generations.js';

const AGENT = join(REPO_ROOT, 'ocf', 'lockstep');
const OCF_ROOT = '/usr/lib/ocf';
const DTD = '/usr/share/resource-agents/ra-api-1.dtd';
const OCF = { SUCCESS: 0, ERR_GENERIC: 1, ERR_ARGS: 2, ERR_UNIMPLEMENTED: 3, ERR_CONFIGURED: 6, ERR_INSTALLED: 5, NOT_RUNNING: 7, RUNNING_PROMOTED: 8, FAILED_PROMOTED: 9 };

function toolsPresent(t: { skip(msg: string): void }): boolean {
  for (const tool of ['ocf-tester', 'crm_simulate', 'crm_attribute', 'xmllint']) {
    if (!requireTool(tool)) {
      t.skip(`${tool} is not installed`);
      return false;
    }
  }
  return true;
}

interface Node {
  dir: string;
  image: string;
  meta: string;
  stateDir: string;
}

function makeNode(root: string, name: string, meta: Partial<DiskMeta> | null): Node {
  const dir = join(root, name);
  mkdirSync(dir, { recursive: true });
  const image = join(dir, 'disk.img');
  writeFileSync(image, Buffer.alloc(0));
  spawnSync('truncate', ['-s', '4M', image]);
  const metaPath = join(dir, 'disk.meta.json');
  if (meta) writeFileSync(metaPath, JSON.stringify({ ...justCreated('disk.img', 4 << 20, 'secondary'), ...meta }));
  return { dir, image, meta: metaPath, stateDir: join(dir, 'state') };
}

function agent(node: Node, action: string | string[], env: Record<string, string> = {}): { rc: number; out: string } {
  const r = spawnSync(AGENT, typeof action === 'string' ? [action] : action, {
    encoding: 'utf8',
    env: {
      ...process.env,
      OCF_ROOT,
      OCF_RESOURCE_INSTANCE: 'lockstep',
      OCF_RESKEY_state_dir: node.stateDir,
      OCF_RESKEY_image: node.image,
      OCF_RESKEY_binary: LOCKSTEP_BIN,
      ...env,
    },
  });
  return { rc: r.status ?? -1, out: `${r.stdout}${r.stderr}` };
}

test('meta-data is valid OCF resource agent XML with every action of a promotable agent', (t) => {
  if (!toolsPresent(t)) return;
  const r = spawnSync(AGENT, ['meta-data'], { encoding: 'utf8', env: { ...process.env, OCF_ROOT } });
  assert.equal(r.status, 0);
  const dir = mkdtempSync(join(tmpdir(), 'ocf-meta-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  writeFileSync(join(dir, 'meta.xml'), r.stdout);
  const v = spawnSync('xmllint', ['--noout', '--dtdvalid', DTD, join(dir, 'meta.xml')], { encoding: 'utf8' });
  assert.equal(v.status, 0, v.stderr);
  for (const a of ['start', 'stop', 'monitor', 'promote', 'demote', 'notify', 'meta-data', 'validate-all']) {
    assert.match(r.stdout, new RegExp(`<action name="${a}"`));
  }
  assert.match(r.stdout, /<version>1\.1<\/version>/);
});

test('ocf-tester passes the agent against real lockstep daemons', (t) => {
  if (!toolsPresent(t)) return;
  const root = mkdtempSync(join(tmpdir(), 'ocf-tester-'));
  const node = makeNode(root, 'n1', { consistent: true });
  t.after(() => {
    agent(node, 'stop');
    rmSync(root, { recursive: true, force: true });
  });
  const r = spawnSync('ocf-tester', ['-n', 'lockstep', '-o', `state_dir=${node.stateDir}`, '-o', `image=${node.image}`, '-o', `binary=${LOCKSTEP_BIN}`, AGENT], {
    encoding: 'utf8',
    env: { ...process.env, OCF_ROOT },
  });
  assert.equal(r.status, 0, `${r.stdout}${r.stderr}`);
  assert.match(r.stdout, /passed all tests/);
});

test('monitor follows the daemon: 7 stopped, 0 secondary, 8 serving, 9 when the primary crashed; bad parameters 6 and 2', (t) => {
  if (!toolsPresent(t)) return;
  const root = mkdtempSync(join(tmpdir(), 'ocf-monitor-'));
  const node = makeNode(root, 'n1', { consistent: true, role: 'secondary', checkpoint: 3 });
  t.after(() => {
    agent(node, 'stop');
    rmSync(root, { recursive: true, force: true });
  });
  assert.equal(agent(node, 'monitor').rc, OCF.NOT_RUNNING);
  assert.equal(agent(node, 'start').rc, OCF.SUCCESS);
  assert.equal(agent(node, 'start').rc, OCF.SUCCESS, 'start is idempotent');
  assert.equal(agent(node, 'monitor').rc, OCF.SUCCESS);
  assert.equal(agent(node, 'promote').rc, OCF.SUCCESS);
  assert.equal(agent(node, 'monitor').rc, OCF.RUNNING_PROMOTED);
  // the promoted node really serves the disk over NBD
  const info = spawnSync('nbdinfo', ['--size', `nbd+unix:///disk?socket=${join(node.stateDir, 'nbd.sock')}`], { encoding: 'utf8' });
  if (info.status === 0 || process.env.CI) assert.equal(info.stdout.trim(), String(4 << 20), info.stderr);
  assert.equal(agent(node, 'demote').rc, OCF.SUCCESS);
  assert.equal(agent(node, 'monitor').rc, OCF.SUCCESS);
  assert.equal(agent(node, 'promote').rc, OCF.SUCCESS);
  const pid = Number(readFileSync(join(node.stateDir, 'daemon.pid'), 'utf8'));
  process.kill(pid, 'SIGKILL');
  spawnSync('sh', ['-c', `while kill -0 ${pid} 2>/dev/null; do sleep 0.05; done`]);
  assert.equal(agent(node, 'monitor').rc, OCF.FAILED_PROMOTED);
  assert.equal(agent(node, 'stop').rc, OCF.SUCCESS);
  assert.equal(agent(node, 'stop').rc, OCF.SUCCESS, 'stop is idempotent');
  assert.equal(agent(node, 'monitor').rc, OCF.NOT_RUNNING);
  assert.equal(agent(node, 'validate-all', { OCF_RESKEY_state_dir: '' }).rc, OCF.ERR_CONFIGURED);
  assert.equal(agent(node, 'validate-all', { OCF_RESKEY_format: 'vmdk' }).rc, OCF.ERR_CONFIGURED);
  assert.equal(agent(node, 'validate-all', { OCF_RESKEY_image: join(root, 'missing.img') }).rc, OCF.ERR_ARGS);
});

test('OCF 1.1 exit codes for bad calls: no action 2, an unknown one 3, further arguments ignored; a bad on_lease_expiry 6 in both modes; a file this node lacks 2, and a probe there 7', (t) => {
  if (!toolsPresent(t)) return;
  const root = mkdtempSync(join(tmpdir(), 'ocf-args-'));
  const node = makeNode(root, 'n1', { consistent: true });
  t.after(() => {
    agent(node, 'stop');
    rmSync(root, { recursive: true, force: true });
  });
  const none = agent(node, []);
  assert.equal(none.rc, OCF.ERR_ARGS);
  assert.match(none.out, /usage: .*\{start\|stop\|monitor/);
  assert.equal(agent(node, '').rc, OCF.ERR_ARGS);
  assert.equal(agent(node, 'frobnicate').rc, OCF.ERR_UNIMPLEMENTED);
  // the action is the sole argument: the rest is for extensions, ignored
  assert.equal(agent(node, ['monitor', 'extra']).rc, OCF.NOT_RUNNING);
  assert.equal(agent(node, ['meta-data', '--verbose']).rc, OCF.SUCCESS);

  const bad = agent(node, 'validate-all', { OCF_RESKEY_on_lease_expiry: 'panic' });
  assert.equal(bad.rc, OCF.ERR_CONFIGURED);
  assert.match(bad.out, /on_lease_expiry must be hold \(or suspend-io\) or io-error, not 'panic'/);
  assert.equal(agent(node, 'start', { OCF_RESKEY_on_lease_expiry: 'panic' }).rc, OCF.ERR_CONFIGURED, 'every action but stop validates');
  assert.equal(agent(node, 'monitor').rc, OCF.NOT_RUNNING, 'and starts nothing');
  for (const v of ['hold', 'suspend-io', 'io-error']) assert.equal(agent(node, 'validate-all', { OCF_RESKEY_on_lease_expiry: v }).rc, OCF.SUCCESS, v);
  assert.equal(agent(node, 'validate-all', { OCF_RESKEY_lease: 'off', OCF_RESKEY_on_lease_expiry: 'io-error' }).rc, OCF.ERR_CONFIGURED);
  const pair = {
    OCF_RESKEY_nodes: 'n1=127.0.0.1:1 n2=127.0.0.1:2',
    OCF_RESKEY_node: 'n1',
    OCF_RESKEY_data_dir: join(root, 'data'),
    OCF_RESKEY_image: '',
  };
  assert.equal(agent(node, 'validate-all', pair).rc, OCF.SUCCESS);
  assert.equal(agent(node, 'validate-all', { ...pair, OCF_RESKEY_on_lease_expiry: 'Hold' }).rc, OCF.ERR_CONFIGURED);
  assert.equal(agent(node, 'validate-all', { ...pair, OCF_RESKEY_tls_dir: join(root, 'no-pki') }).rc, OCF.ERR_ARGS);

  // the image is missing on this node: validate-all says 2 (try another node); a probe says
  // not running here, since nothing can run without it
  const missing = { OCF_RESKEY_image: join(root, 'missing.img') };
  assert.equal(agent(node, 'validate-all', missing).rc, OCF.ERR_ARGS);
  assert.equal(agent(node, 'monitor', { ...missing, OCF_RESKEY_CRM_meta_interval: '0' }).rc, OCF.NOT_RUNNING);
  assert.equal(agent(node, 'monitor', { ...missing, OCF_RESKEY_CRM_meta_interval: '10000' }).rc, OCF.ERR_ARGS);
  assert.equal(agent(node, 'start', missing).rc, OCF.ERR_ARGS);
});

test('promote is refused while the disk is not consistent', (t) => {
  if (!toolsPresent(t)) return;
  const root = mkdtempSync(join(tmpdir(), 'ocf-refuse-'));
  const node = makeNode(root, 'n1', { consistent: false, role: 'secondary', checkpoint: 7 });
  t.after(() => {
    agent(node, 'stop');
    rmSync(root, { recursive: true, force: true });
  });
  assert.equal(agent(node, 'start').rc, OCF.SUCCESS);
  const r = agent(node, 'promote');
  assert.equal(r.rc, OCF.ERR_GENERIC);
  assert.match(r.out, /refusing to promote.*not consistent/);
  assert.equal(agent(node, 'monitor').rc, OCF.SUCCESS, 'still a secondary, not serving');
  assert.equal(agent(node, 'stop').rc, OCF.SUCCESS);
});

const CIB = `<cib crm_feature_set="3.16.1" validate-with="pacemaker-3.9" have-quorum="1" epoch="1" num_updates="0" admin_epoch="0">
  <configuration>
    <crm_config>
      <cluster_property_set id="cib-bootstrap-options">
        <nvpair id="opt-stonith" name="stonith-enabled" value="false"/>
        <nvpair id="opt-nq" name="no-quorum-policy" value="ignore"/>
      </cluster_property_set>
    </crm_config>
    <nodes>
      <node id="1" uname="n1"/>
      <node id="2" uname="n2"/>
    </nodes>
    <resources>
      <clone id="lockstep-clone">
        <meta_attributes id="lockstep-clone-meta">
          <nvpair id="lockstep-clone-promotable" name="promotable" value="true"/>
          <nvpair id="lockstep-clone-pm" name="promoted-max" value="1"/>
          <nvpair id="lockstep-clone-cm" name="clone-max" value="2"/>
        </meta_attributes>
        <primitive id="lockstep" class="ocf" provider="lockstep" type="lockstep">
          <instance_attributes id="lockstep-params">
            <nvpair id="lockstep-sd" name="state_dir" value="/var/lib/lockstep/ocf"/>
            <nvpair id="lockstep-img" name="image" value="/var/lib/lockstep/disk.img"/>
          </instance_attributes>
        </primitive>
      </clone>
    </resources>
    <constraints/>
  </configuration>
  <status>
    <node_state id="1" uname="n1" in_ccm="true" crmd="online" join="member" expected="member"/>
    <node_state id="2" uname="n2" in_ccm="true" crmd="online" join="member" expected="member"/>
  </status>
</cib>
`;

/** The scheduler's plan for the CIB in `file` after `args` (e.g. --node-fail n1); writes the result to `out`. */
function simulate(file: string, out: string, args: string[] = []): string {
  const r = spawnSync('crm_simulate', ['-x', file, '-S', '-O', out, ...args], { encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr);
  const m = /Transition Summary:\n([\s\S]*?)\n\s*\n?Executing Cluster Transition/.exec(r.stdout);
  assert.ok(m, r.stdout);
  return m[1] ?? "";
}

/** Each node's agent runs notify (which refreshes the promotion score, as monitor does) with
 *  CIB_file pointing at `cib`, so that crm_attribute writes the score there. */
function scoresFromAgents(cib: string, nodes: Array<[string, Node]>): void {
  for (const [uname, node] of nodes) {
    assert.equal(agent(node, 'notify', { CIB_file: cib, OCF_RESKEY_CRM_meta_on_node: uname }).rc, OCF.SUCCESS);
  }
}

function score(cib: string, uname: string): string | undefined {
  const id = uname === 'n1' ? 1 : 2;
  return new RegExp(`id="status-${id}-master-lockstep" name="master-lockstep" value="(\\d+)"`).exec(readFileSync(cib, 'utf8'))?.[1];
}

test('crm_simulate: the primary node fails, the consistent secondary is promoted, using the scores the agent wrote', (t) => {
  if (!toolsPresent(t)) return;
  const root = mkdtempSync(join(tmpdir(), 'ocf-sim-'));
  t.after(() => rmSync(root, { recursive: true, force: true }));
  const cib = join(root, 'cib.xml');
  writeFileSync(cib, CIB);
  const n1 = makeNode(root, 'n1', { consistent: true, role: 'primary', checkpoint: 12 });
  const n2 = makeNode(root, 'n2', { consistent: true, role: 'secondary', checkpoint: 12 });
  scoresFromAgents(cib, [['n1', n1], ['n2', n2]]);
  assert.equal(score(cib, 'n1'), '10000');
  assert.equal(score(cib, 'n2'), '1000');
  const first = simulate(cib, join(root, 'run1.xml'));
  assert.match(first, /Promote\s+lockstep:\d\s+\(\s*Stopped -> Promoted n1\s*\)/);
  assert.match(first, /Start\s+lockstep:\d\s+\(\s*n2\s*\)/);
  const failover = simulate(join(root, 'run1.xml'), join(root, 'run2.xml'), ['--node-fail', 'n1']);
  assert.match(failover, /Promote\s+lockstep:\d\s+\(\s*Unpromoted -> Promoted n2\s*\)/);
});

test('crm_simulate: the primary node fails, a secondary whose disk is inconsistent has no score and is not promoted', (t) => {
  if (!toolsPresent(t)) return;
  const root = mkdtempSync(join(tmpdir(), 'ocf-sim-'));
  t.after(() => rmSync(root, { recursive: true, force: true }));
  const cib = join(root, 'cib.xml');
  writeFileSync(cib, CIB);
  const n1 = makeNode(root, 'n1', { consistent: true, role: 'primary', checkpoint: 12 });
  const n2 = makeNode(root, 'n2', { consistent: false, role: 'secondary', checkpoint: 12 });
  scoresFromAgents(cib, [['n1', n1], ['n2', n2]]);
  assert.equal(score(cib, 'n1'), '10000');
  assert.equal(score(cib, 'n2'), undefined);
  const first = simulate(cib, join(root, 'run1.xml'));
  assert.match(first, /Promoted n1/);
  const failover = simulate(join(root, 'run1.xml'), join(root, 'run2.xml'), ['--node-fail', 'n1']);
  assert.doesNotMatch(failover, /Promote/);
  assert.doesNotMatch(failover, /Promoted n2/);
});
