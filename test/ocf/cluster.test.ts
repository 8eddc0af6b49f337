// A real two-node cluster: corosync and Pacemaker in two network namespaces, each node with its
// own /etc/corosync, /var/lib/pacemaker, /run and /dev/shm (test/ocf/cluster-node.sh), running
// the agent as a promotable clone in pair mode. Pacemaker promotes one node (the pair's
// supervisor starts there), an NBD client writes through it, a checkpoint, one more write; then
// the other node's disk is marked inconsistent and the primary's node loses power (every
// process in its namespace SIGKILLed: corosync, Pacemaker, the daemon, the supervisor).
// Pacemaker sees the node gone and, once it has settled, has not promoted the inconsistent
// survivor; with the record restored, the survivor's next monitor gives it its score, Pacemaker
// promotes it, and it serves the disk byte for byte as it was at the checkpoint.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { NbdClient } from '../../src/nbd/client/client.js';
import { tempDir } from '../helpers/graph.js';
import { REPO_ROOT, LOCKSTEP_BIN, requireTool } from '../helpers/processes.js';
import { canMakeNetns, makeNetwork } from '../helpers/netns.js';
import type { DiskMeta } from '../../src/pair/generations.js';

const HELPER = join(REPO_ROOT, 'test', 'ocf', 'cluster-node.sh');
const MiB = 1024 * 1024;
const SIZE = 16 * MiB;
const QMP_PORT = 4444;

const usable = ['corosync', 'pacemakerd', 'cibadmin', 'crm_mon', 'crm_resource', 'nsenter', 'ip', 'setsid', 'ocf-tester'].every((t) => requireTool(t)) && canMakeNetns();
const skip = usable ? false : 'needs root, network namespaces, corosync, pacemaker and resource-agents';

function corosyncConf(a: string, b: string): string {
  return `totem {
    version: 2
    cluster_name: lockstep-test
    transport: knet
    crypto_cipher: none
    crypto_hash: none
    token: 1000
}
nodelist {
    node {
        ring0_addr: ${a}
        name: n1
        nodeid: 1
    }
    node {
        ring0_addr: ${b}
        name: n2
        nodeid: 2
    }
}
quorum {
    provider: corosync_votequorum
    two_node: 1
}
logging {
    to_stderr: yes
    to_syslog: no
}
`;
}

function resourceXml(a: string, b: string): string {
  return `<clone id="disk0-clone">
  <meta_attributes id="disk0-clone-meta">
    <nvpair id="disk0-promotable" name="promotable" value="true"/>
    <nvpair id="disk0-pm" name="promoted-max" value="1"/>
    <nvpair id="disk0-cm" name="clone-max" value="2"/>
    <nvpair id="disk0-notify" name="notify" value="true"/>
  </meta_attributes>
  <primitive id="disk0" class="ocf" provider="lockstep" type="lockstep">
    <instance_attributes id="disk0-params">
      <nvpair id="disk0-nodes" name="nodes" value="n1=${a}:${QMP_PORT} n2=${b}:${QMP_PORT}"/>
      <nvpair id="disk0-sd" name="state_dir" value="/run/lockstep/state"/>
      <nvpair id="disk0-dd" name="data_dir" value="/run/lockstep/data"/>
      <nvpair id="disk0-bin" name="binary" value="${LOCKSTEP_BIN}"/>
      <nvpair id="disk0-size" name="size" value="${SIZE}"/>
      <nvpair id="disk0-ci" name="checkpoint_interval" value="0"/>
    </instance_attributes>
    <operations>
      <op id="disk0-mon-p" name="monitor" interval="2s" role="Promoted" timeout="30s"/>
      <op id="disk0-mon-u" name="monitor" interval="3s" role="Unpromoted" timeout="30s"/>
      <op id="disk0-promote" name="promote" interval="0" timeout="120s"/>
    </operations>
  </primitive>
</clone>`;
}

async function until<T>(what: string, fn: () => T | undefined, timeoutMs = 90_000): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = fn();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

function firstDiff(a: Buffer, b: Buffer): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return -1;
}

test('a two-node corosync + Pacemaker cluster promotes one node, and after its power loss the other, never while its disk is inconsistent', { skip, timeout: 240_000 }, async (t) => {
  const net = makeNetwork(17);
  const root = tempDir(t, 'ocf-cluster-');
  const nodes = { n1: net.a, n2: net.b } as const;
  type Name = keyof typeof nodes;
  const kill = (name: Name) => {
    const pids = spawnSync('ip', ['netns', 'pids', nodes[name].ns], { encoding: 'utf8' }).stdout.split('\n').filter(Boolean);
    for (const p of pids) {
      try {
        process.kill(Number(p), 'SIGKILL');
      } catch {
        /* gone */
      }
    }
    return pids.length;
  };
  t.after(() => {
    kill('n1');
    kill('n2');
    net.remove();
  });
  writeFileSync(join(root, 'corosync.conf'), corosyncConf(net.a.ip, net.b.ip));
  // the mount point of the agent in each node's mount namespace (the host's stays empty)
  mkdirSync('/usr/lib/ocf/resource.d/lockstep', { recursive: true });
  for (const name of ['n1', 'n2'] as const) {
    const child = spawn('ip', ['netns', 'exec', nodes[name].ns, 'unshare', '-m', '--propagation', 'private', HELPER, name, root, join(REPO_ROOT, 'ocf')], {
      stdio: ['ignore', 'ignore', 'pipe'],
      detached: true,
    });
    child.stderr!.on('data', (d: Buffer) => process.stderr.write(`${name}: ${d}`));
    child.unref();
  }
  const pacemakerd = (name: Name): number | undefined => {
    try {
      return Number(readFileSync(join(root, name, 'pacemakerd.pid'), 'utf8'));
    } catch {
      return undefined;
    }
  };
  /** A Pacemaker command on a node, in its namespaces (its CIB, its IPC). */
  const on = (name: Name, args: string[]) => {
    const r = spawnSync('nsenter', ['-t', String(pacemakerd(name)), '-m', '-n', ...args], { encoding: 'utf8' });
    return { rc: r.status, out: `${r.stdout}${r.stderr}` };
  };
  const promoted = (name: Name, survivor: Name = name): boolean => new RegExp(`running on: ${name} Promoted`).test(on(survivor, ['crm_resource', '--locate', '-r', 'disk0-clone']).out);
  const stateDir = (name: Name) => join(root, name, 'run', 'lockstep', 'state');

  await until('both nodes online', () => (pacemakerd('n1') && pacemakerd('n2') && /Online: \[ n1 n2 \]/.test(on('n1', ['crm_mon', '-1']).out) ? true : undefined));
  // Test only: no fence device exists between two namespaces, and the test itself powers the
  // node off (every process SIGKILLed) before Pacemaker decides. A real cluster needs STONITH
  // (docs/cluster.md). Quorum: two_node in corosync.conf keeps the survivor quorate.
  let r = on('n1', ['crm_attribute', '-t', 'crm_config', '-n', 'stonith-enabled', '-v', 'false']);
  assert.equal(r.rc, 0, r.out);
  writeFileSync(join(root, 'resource.xml'), resourceXml(net.a.ip, net.b.ip));
  r = on('n1', ['cibadmin', '--create', '-o', 'resources', '--xml-file', join(root, 'resource.xml')]);
  assert.equal(r.rc, 0, r.out);

  const primary = await until('a node promoted', () => (['n1', 'n2'] as const).find((n) => promoted(n, 'n1')));
  const other: Name = primary === 'n1' ? 'n2' : 'n1';
  // the pair is protected before the promote returns: the other node is its live secondary
  await until('the other node unpromoted', () => (new RegExp(`running on: ${other}(?! Promoted)`).test(on('n1', ['crm_resource', '--locate', '-r', 'disk0-clone']).out) ? true : undefined));

  // serving: the supervisor exports the disk once the pair is protected
  await until('the primary to serve', () => (existsSync(join(stateDir(primary), 'nbd.sock')) ? true : undefined));
  const want = Buffer.alloc(SIZE);
  const c = await NbdClient.connect({ address: { type: 'unix', path: join(stateDir(primary), 'nbd.sock') }, exportName: 'disk' });
  const a = Buffer.alloc(MiB);
  for (let i = 0; i < a.length; i++) a[i] = (i * 131 + 7) & 0xff;
  await c.write(0, a);
  a.copy(want, 0);
  await c.write(5 * MiB + 4096, Buffer.alloc(64 * 1024, 0x5a));
  want.fill(0x5a, 5 * MiB + 4096, 5 * MiB + 4096 + 64 * 1024);
  const cp = spawnSync(process.execPath, [LOCKSTEP_BIN, 'pair', 'checkpoint', '--control', join(stateDir(primary), 'supervisor', 'pair.sock')], { encoding: 'utf8' });
  assert.equal(cp.status, 0, cp.stderr);
  // acknowledged after the checkpoint, never flushed: a failover goes back before it
  await c.write(0, Buffer.alloc(64 * 1024, 0x77));

  // the live secondary has a promotion score (a transient node attribute its monitor sets)
  const hasScore = () => on(other, ['crm_attribute', '-l', 'reboot', '-n', 'master-disk0', '-N', other, '-G', '-q']).rc === 0;
  await until('the live secondary to have a score', () => (hasScore() ? true : undefined));
  // the survivor's disk as a resync target that did not finish: never promoted
  const metaPath = join(root, other, 'run', 'lockstep', 'data', 'secondary.qcow2.meta.json');
  const good = readFileSync(metaPath, 'utf8');
  writeFileSync(metaPath, JSON.stringify({ ...(JSON.parse(good) as DiskMeta), consistent: false }));
  // its next monitor deletes that score
  await until('the inconsistent node to lose its score', () => (hasScore() ? undefined : true));

  assert.ok(kill(primary) > 0);
  c.destroy();
  await until(`${primary} offline`, () => (new RegExp(`OFFLINE: \\[ ${primary} \\]`).test(on(other, ['crm_mon', '-1']).out) ? true : undefined));
  // the cluster has acted on the loss and settled
  r = on(other, ['crm_resource', '--wait', '--timeout', '60']);
  assert.equal(r.rc, 0, r.out);
  assert.equal(promoted(other), false, 'an inconsistent disk is never promoted');
  assert.equal(readFileSync(join(stateDir(other), 'role'), 'utf8').trim(), 'secondary');

  // the record restored: the next monitor sets the score and Pacemaker promotes (the takeover)
  writeFileSync(metaPath, good);
  await until(`${other} promoted`, () => (promoted(other) ? true : undefined));
  await until(`${other} serving`, () => (readFileSync(join(stateDir(other), 'role'), 'utf8').trim() === 'primary' && existsSync(join(stateDir(other), 'nbd.sock')) ? true : undefined));
  const d = await NbdClient.connect({ address: { type: 'unix', path: join(stateDir(other), 'nbd.sock') }, exportName: 'disk' });
  try {
    assert.equal(firstDiff(await d.read(0, SIZE), want), -1, 'the survivor serves the disk as it was at the checkpoint');
  } finally {
    await d.disconnect();
  }
});
