// The same QMP conversation sent to QEMU 7.2 (qemu-system-x86_64 -machine none -qmp stdio)
// and to `lockstep daemon`: every reply must be identical (events aside). This pins the
// protocol checks, the argument validation messages and the command error messages to QEMU's.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { tempDir } from '../helpers/graph.js';
import { buildHas, startDaemon } from '../helpers/daemon.js';
import { requireTool } from '../helpers/tls.js';
import { QmpClient } from '../../src/qmp/client.js';

const BEFORE_NEGOTIATION = ['{"execute":"query-status"}', '{"execute":"nothing-like-this","id":"x"}', '{"execute":"qmp_capabilities","id":0}'];

/** Requests after negotiation, one per line, each answered with exactly one reply. */
const CONVERSATION = [
  '{"execute":"qmp_capabilities"}',
  '{"execute":"foo","id":5}',
  '{"execute":"query-status","id":["a",{"b":null}]}',
  '[1]',
  '{"foo":1}',
  '{"execute":1}',
  '{"execute":"query-status","arguments":[]}',
  '{"execute":"query-status","arguments":{"a":1}}',
  '{"id":1}',
  '{"exec-oob":"query-status"}',
  '{"execute": foo}',
  '@',
  '{"execute":"query-block-exports"}',
  '{"execute":"query-named-block-nodes","arguments":{"flat":"yes"}}',
  // blockdev-add / -del
  '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n0","size":1048576}}',
  '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n0","size":1048576}}',
  '{"execute":"blockdev-add","arguments":{"node-name":"q"}}',
  '{"execute":"blockdev-add","arguments":{"driver":"null-co","size":1}}',
  '{"execute":"blockdev-add","arguments":{"driver":"null-cox","node-name":"n1"}}',
  '{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"n2","file":{"driver":"file"}}}',
  '{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"n2","file":{"driver":"null-co","bogus":1}}}',
  '{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"n2","file":"nothere"}}',
  '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n1","read-only":"yes"}}',
  '{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"r0","file":"n0"}}',
  '{"execute":"blockdev-del","arguments":{"node-name":"x"}}',
  '{"execute":"blockdev-del","arguments":{"node-name":"n0"}}',
  '{"execute":"blockdev-del","arguments":{}}',
  // blockdev-reopen
  '{"execute":"blockdev-reopen","arguments":{"options":[{"driver":"null-co"}]}}',
  '{"execute":"blockdev-reopen","arguments":{"options":[{"driver":"null-co","node-name":"x"}]}}',
  '{"execute":"blockdev-reopen","arguments":{"options":[{"driver":"null-co","node-name":"n0","size":4096}]}}',
  '{"execute":"blockdev-reopen","arguments":{"options":[{"driver":"null-co","node-name":"n0"}]}}',
  '{"execute":"blockdev-reopen","arguments":{"options":{}}}',
  // x-blockdev-change
  '{"execute":"x-blockdev-change","arguments":{"parent":"x"}}',
  '{"execute":"x-blockdev-change","arguments":{"parent":"n0"}}',
  '{"execute":"x-blockdev-change","arguments":{"parent":"n0","child":"c","node":"n0"}}',
  '{"execute":"x-blockdev-change","arguments":{"parent":"r0","child":"foo"}}',
  '{"execute":"x-blockdev-change","arguments":{"parent":"n0","node":"r0"}}',
  // NBD server and exports
  '{"execute":"nbd-server-stop"}',
  '{"execute":"nbd-server-remove","arguments":{"name":"x"}}',
  '{"execute":"nbd-server-remove","arguments":{"name":"x","mode":"foo"}}',
  '{"execute":"block-export-del","arguments":{"id":"x"}}',
  '{"execute":"nbd-server-add","arguments":{"device":"x"}}',
  '{"execute":"nbd-server-add","arguments":{"device":"n0"}}',
  '{"execute":"block-export-add","arguments":{"type":"nbd","id":"e0","node-name":"n0"}}',
  '{"execute":"block-export-add","arguments":{"type":"nbdx","id":"e0","node-name":"n0"}}',
  '{"execute":"nbd-server-start","arguments":{"addr":{"type":"inet","data":{"host":"127.0.0.1","port":0}}}}',
  '{"execute":"nbd-server-start","arguments":{"addr":{"type":"inetx","data":{"host":"127.0.0.1","port":"0"}}}}',
  '{"execute":"nbd-server-start","arguments":{"addr":{"type":"inet","data":{"host":1}}}}',
  '{"execute":"nbd-server-start","arguments":{"addr":{"type":"inet"}}}',
  '{"execute":"nbd-server-start","arguments":{}}',
  // objects
  '{"execute":"object-add","arguments":{"qom-type":"foo","id":"t0"}}',
  '{"execute":"object-add","arguments":{"qom-type":"tls-creds-x509","id":"t0","dir":"/nonexist","endpoint":"server"}}',
  '{"execute":"object-add","arguments":{"qom-type":"tls-creds-x509","id":"t0","dir":"/tmp","endpoint":"serverx"}}',
  '{"execute":"object-add","arguments":{"qom-type":"tls-creds-x509","id":"t0","dir":"/tmp","endpoint":"server","verify-peer":"on"}}',
  '{"execute":"object-add","arguments":{"qom-type":"tls-creds-x509","id":"t0","dir":"/tmp","endpoint":"server","x":1}}',
  '{"execute":"object-add","arguments":{"qom-type":"tls-creds-x509","id":"t0","endpoint":"server"}}',
  '{"execute":"object-add","arguments":{"qom-type":"secret","id":"s0","data":"abc"}}',
  '{"execute":"object-add","arguments":{"qom-type":"secret","id":"s0","data":"abc"}}',
  '{"execute":"object-del","arguments":{"id":"s0"}}',
  '{"execute":"object-del","arguments":{"id":"t9"}}',
  // HMP
  '{"execute":"human-monitor-command","arguments":{"command-line":"foo"}}',
  '{"execute":"human-monitor-command","arguments":{"command-line":"drive_del d9"}}',
  '{"execute":"human-monitor-command","arguments":{"command-line":"drive_add -n buddy driver=null-co,node-name=d1"}}',
  '{"execute":"human-monitor-command","arguments":{"command-line":"drive_add -n buddy driver=null-co,node-name=d1"}}',
  '{"execute":"human-monitor-command","arguments":{"command-line":"drive_del d1"}}',
  '{"execute":"human-monitor-command","arguments":{"command-line":"qemu-io -d n0 \\"read 0 512\\""}}',
  '{"execute":"human-monitor-command","arguments":{"command-line":"info block"}}',
  '{"execute":"human-monitor-command"}',
];

/** Block job rows: sent when the build has block jobs wired (src/daemon/wiring.ts). */
const JOB_ROWS = [
  // block jobs that cannot start, or do not exist
  '{"execute":"query-block-jobs"}',
  '{"execute":"query-jobs"}',
  '{"execute":"blockdev-backup","arguments":{"device":"x","target":"n0","sync":"full"}}',
  '{"execute":"blockdev-backup","arguments":{"device":"n0","target":"x","sync":"full"}}',
  '{"execute":"blockdev-backup","arguments":{"device":"n0","target":"n0","sync":"fullx"}}',
  '{"execute":"blockdev-backup","arguments":{"device":"n0","target":"n0","sync":3}}',
  '{"execute":"blockdev-mirror","arguments":{"device":"n0","target":"n0","sync":"full","speed":true}}',
  '{"execute":"blockdev-mirror","arguments":{"device":"x","target":"n0","sync":"full"}}',
  '{"execute":"blockdev-mirror","arguments":{"job-id":"m2","device":"n0","target":"n0","sync":"full"}}',
  '{"execute":"drive-mirror","arguments":{"device":"x","target":"nbd://127.0.0.1:1/x","sync":"full","mode":"existing","format":"raw"}}',
  '{"execute":"drive-mirror","arguments":{"job-id":"m1","device":"n0","target":"/nonexistent/t.raw","sync":"full","mode":"existing","format":"raw"}}',
  '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"b0","size":1048576}}',
  '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"b1","size":1048576}}',
  '{"execute":"blockdev-backup","arguments":{"device":"b0","target":"b1","sync":"full"}}',
  '{"execute":"blockdev-backup","arguments":{"job-id":"j0","device":"b0","target":"b1","sync":"full","speed":-1}}',
  '{"execute":"blockdev-mirror","arguments":{"job-id":"m3","device":"b0","target":"b1","sync":"full","granularity":1000}}',
  '{"execute":"blockdev-mirror","arguments":{"job-id":"9bad","device":"b0","target":"b1","sync":"full"}}',
  '{"execute":"blockdev-del","arguments":{"node-name":"b0"}}',
  '{"execute":"blockdev-del","arguments":{"node-name":"b1"}}',
  '{"execute":"block-commit","arguments":{"device":"x"}}',
  '{"execute":"block-commit","arguments":{"device":"n0"}}',
  '{"execute":"block-job-cancel","arguments":{"device":"x"}}',
  '{"execute":"block-job-complete","arguments":{"device":"x"}}',
  '{"execute":"block-job-pause","arguments":{"device":"x"}}',
  '{"execute":"block-job-resume","arguments":{"device":"x"}}',
  '{"execute":"block-job-set-speed","arguments":{"device":"x","speed":1}}',
  '{"execute":"job-dismiss","arguments":{"id":"x"}}',
  '{"execute":"job-finalize","arguments":{"id":"x"}}',
];

const CLEANUP = [
  '{"execute":"blockdev-del","arguments":{"node-name":"r0"}}',
  '{"execute":"blockdev-del","arguments":{"node-name":"n0"}}',
  '{"execute":"query-named-block-nodes"}',
  '{"execute":"quit"}',
];

async function askQemu(lines: string[]): Promise<unknown[]> {
  const p = spawn('qemu-system-x86_64', ['-machine', 'none', '-nodefaults', '-display', 'none', '-qmp', 'stdio'], { stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  p.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
  p.stdin.end(lines.join('\n') + '\n');
  await new Promise((r) => p.on('close', r));
  return out
    .split('\n')
    .filter((l) => l.trim().startsWith('{'))
    .map((l) => JSON.parse(l) as Record<string, unknown>)
    .filter((m) => !('QMP' in m) && !('event' in m));
}

async function askLockstep(path: string, lines: string[], count: number): Promise<unknown[]> {
  const c = await QmpClient.connect({ type: 'unix', path });
  try {
    c.sendRaw(lines.join('\n') + '\n');
    const out: unknown[] = [];
    for (let i = 0; i < count; i++) out.push(await c.nextReply());
    return out;
  } finally {
    c.close();
  }
}

test('lockstep answers a QMP conversation exactly as QEMU 7.2 does', async (t) => {
  if (!requireTool(t, 'qemu-system-x86_64', ['--version'])) return;
  const dir = tempDir(t);
  const d = await startDaemon(t, dir, []);
  const probe = await d.client();
  const withJobs = await buildHas(probe, 'jobs', dir);
  probe.close();
  if (!withJobs) t.diagnostic('block jobs are not wired into this build: the job rows are left out');
  const lines = [...BEFORE_NEGOTIATION, ...CONVERSATION, ...(withJobs ? JOB_ROWS : []), ...CLEANUP];
  const qemu = await askQemu(lines);
  assert.equal(qemu.length, lines.length, 'QEMU answered every line');
  const ours = await askLockstep(d.qmpPath, lines, lines.length);
  for (let i = 0; i < lines.length; i++) {
    assert.deepEqual(ours[i], qemu[i], `reply to ${lines[i]}`);
  }
  assert.equal(await d.exited, 0);
});
