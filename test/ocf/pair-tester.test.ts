// ocf-tester in pair mode: the agent's OCF checks (meta-data, validate-all, start/stop twice,
// the promote/demote cycles, notify) on one node of a pair, against real daemons on loopback.
// The peer node is a `lockstep pair host` started by its own agent; ocf-tester promotes this
// node again after each demote, which in a cluster would promote the peer instead, so the test
// plays the peer's Pacemaker: a peer left holding the graph of a pair whose primary was demoted
// is restarted (stop, start) by its agent, and the promote waits for it as a fresh pair host.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { promisify } from 'node:util';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from '../helpers/graph.js';
import { REPO_ROOT, LOCKSTEP_BIN, killProcessesNaming, requireTool } from '../helpers/processes.js';

const run = promisify(execFile);
const AGENT = join(REPO_ROOT, 'ocf', 'lockstep');
const OCF_ROOT = '/usr/lib/ocf';
const usable = ['ocf-tester', 'crm_attribute', 'xmllint', 'setsid'].every((tool) => requireTool(tool));
const skip = usable ? false : 'needs resource-agents (ocf-tester), pacemaker-cli-utils, xmllint and setsid';

// a range of its own (test/ocf/pair: 20000-39999, test/ocf/outdate: 40000-59999)
// below the kernel's ephemeral range (32768+), disjoint from the other tests' fixed ports
const BASE = 26000 + (process.pid % 300) * 10;
const NODES = `n1=127.0.0.1:${BASE}:${BASE + 1} n2=127.0.0.1:${BASE + 2}:${BASE + 3}`;
const CIB = `<cib crm_feature_set="3.16.1" validate-with="pacemaker-3.9" have-quorum="1" epoch="1" num_updates="0" admin_epoch="0">
  <configuration><crm_config/><nodes><node id="1" uname="n1"/><node id="2" uname="n2"/></nodes><resources/><constraints/></configuration>
  <status/>
</cib>
`;

test('ocf-tester passes the agent in pair mode against real pair host daemons', { skip, timeout: 170_000 }, async (t) => {
  const root = tempDir(t, 'ocf-pair-tester-');
  const cib = join(root, 'cib.xml');
  writeFileSync(cib, CIB);
  const dir = (n: string, what: string) => join(root, n, what);
  for (const n of ['n1', 'n2']) mkdirSync(dir(n, 'data'), { recursive: true });
  const params = (n: string, peer: string): Record<string, string> => ({
    nodes: NODES,
    node: n,
    state_dir: dir(n, 'state'),
    data_dir: dir(n, 'data'),
    peer_data_dir: dir(peer, 'data'),
    binary: LOCKSTEP_BIN,
    size: String(8 << 20),
    checkpoint_interval: '1s',
    lease: '400ms',
    peer_wait: '30',
  });
  const env = { ...process.env, OCF_ROOT, CIB_file: cib };
  const peerAgent = async (action: string): Promise<number> => {
    const reskeys = Object.fromEntries(Object.entries(params('n2', 'n1')).map(([k, v]) => [`OCF_RESKEY_${k}`, v]));
    try {
      await run(AGENT, [action], { env: { ...env, OCF_RESOURCE_INSTANCE: 'lockstep', ...reskeys } });
      return 0;
    } catch (e) {
      return (e as { code?: number }).code ?? -1;
    }
  };
  t.after(async () => {
    await peerAgent('stop');
    for (const f of [dir('n1', 'state/supervisor.pid'), dir('n1', 'state/daemon.pid')]) {
      if (existsSync(f)) {
        try {
          process.kill(Number(readFileSync(f, 'utf8')), 'SIGKILL');
        } catch {
          /* gone */
        }
      }
    }
    // a peer daemon restarted while a promote raced its stop can outlive its pid file: nothing
    // this test started may survive it (CI runs saw one such daemon left per run)
    killProcessesNaming(root);
  });
  assert.equal(await peerAgent('start'), 0);

  const opts = Object.entries(params('n1', 'n2')).flatMap(([k, v]) => ['-o', `${k}=${v}`]);
  const tester = spawn('ocf-tester', ['-n', 'lockstep', ...opts, AGENT], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  tester.stdout.on('data', (d: Buffer) => (out += d.toString()));
  tester.stderr.on('data', (d: Buffer) => (out += d.toString()));
  const done = new Promise<number>((r) => tester.on('close', (code) => r(code ?? -1)));
  let finished = false;
  void done.then(() => (finished = true));

  // the peer's side of the cluster: after n1 is demoted, n2 (the live secondary of a pair
  // without a primary) is restarted as a fresh pair host
  let restarts = 0;
  const unpromoted = (): boolean => {
    const role = existsSync(dir('n1', 'state/role')) ? readFileSync(dir('n1', 'state/role'), 'utf8').trim() : 'stopped';
    // (a promote writes the supervisor's pid file right after launching it, long before the
    // supervisor reaches the peer)
    return role !== 'primary' && !existsSync(dir('n1', 'state/supervisor.pid'));
  };
  while (!finished) {
    if (unpromoted()) {
      const r = await run(join(REPO_ROOT, 'bin', 'lockstep-qmp'), ['--host', '127.0.0.1', '--port', String(BASE + 2), 'query-named-block-nodes', '{"flat":true}']).catch(() => null);
      // n1 looked again: a promote that began while the query ran (its supervisor now filling
      // the peer's graph) is not the leftover of an earlier pair
      if (r && r.stdout.trim() !== '[]' && unpromoted()) {
        assert.equal(await peerAgent('stop'), 0);
        assert.equal(await peerAgent('start'), 0);
        restarts++;
      }
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  const rc = await done;
  const supLog = dir('n1', 'state/supervisor.log');
  assert.equal(rc, 0, `${out}\nsupervisor log (last lines):\n${existsSync(supLog) ? readFileSync(supLog, 'utf8').split('\n').slice(-15).join('\n') : '(none)'}`);
  assert.match(out, /passed all tests/);
  // ocf-tester promoted three times: the peer was a pair's secondary after each
  assert.ok(restarts >= 2, `the peer was restarted ${restarts} times\n${out}`);
});
