import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  JOB_STATUSES,
  JOB_TRANSITIONS,
  JOB_VERBS,
  JOB_VERB_TABLE,
  JobManager,
  canTransition,
  verbAllowed,
} from '../../src/jobs/job.js';
import { startBackup } from '../../src/jobs/backup.js';
import { startMirror } from '../../src/jobs/mirror.js';
import { newGraph } from '../helpers/graph.js';
import { addNode, fill, nextEvent, recordEvents, statuses } from '../helpers/jobs.js';
import { StateError } from '../../src/errors.js';

// QEMU 7.2 job.c, written out as rows of 0/1 over U C R P Y S W D X E N.
const ORDER = ['undefined', 'created', 'running', 'paused', 'ready', 'standby', 'waiting', 'pending', 'aborting', 'concluded', 'null'];
const QEMU_STT: Record<string, string> = {
  undefined: '01000000000',
  created: '00100000101',
  running: '00011010100',
  paused: '00100000000',
  ready: '00000110100',
  standby: '00001000000',
  waiting: '00000001100',
  pending: '00000000110',
  aborting: '00000000110',
  concluded: '00000000001',
  null: '00000000000',
};
const QEMU_VERBS: Record<string, string> = {
  cancel: '01111111000',
  pause: '01111100000',
  resume: '01111100000',
  'set-speed': '01111100000',
  complete: '00001000000',
  finalize: '00000001000',
  dismiss: '00000000010',
};

test('the status transition table is exactly QEMU 7.2', () => {
  assert.deepEqual([...JOB_STATUSES], ORDER);
  for (const from of JOB_STATUSES) {
    const row = ORDER.map((to) => (canTransition(from, to as never) ? '1' : '0')).join('');
    assert.equal(row, QEMU_STT[from], `row ${from}`);
    assert.equal(JOB_TRANSITIONS[from].length, [...row].filter((c) => c === '1').length);
  }
});

test('the verb table is exactly QEMU 7.2', () => {
  assert.deepEqual([...JOB_VERBS].sort(), Object.keys(QEMU_VERBS).sort());
  for (const verb of JOB_VERBS) {
    const row = ORDER.map((s) => (verbAllowed(verb, s as never) ? '1' : '0')).join('');
    assert.equal(row, QEMU_VERBS[verb], `verb ${verb}`);
    assert.equal(JOB_VERB_TABLE[verb].length, [...row].filter((c) => c === '1').length);
  }
});

test('a backup job runs created -> running -> waiting -> pending -> concluded -> null with QEMU events', async () => {
  const g = newGraph();
  const mgr = new JobManager(g);
  const events = recordEvents(mgr);
  const src = await addNode(g, { driver: 'memory', size: 1 << 20, 'node-name': 'src' });
  const dst = await addNode(g, { driver: 'memory', size: 1 << 20, 'node-name': 'dst' });
  await src.write(0, fill(1, 1 << 20));
  const job = await startBackup(mgr, { jobId: 'b0', source: src, target: dst, sync: 'full' });
  assert.equal(mgr.queryJobs().length, 1);
  const r = await job.done;
  assert.equal(r.ret, 0);
  assert.equal(r.cancelled, false);
  assert.deepEqual(statuses(events, 'b0'), ['created', 'running', 'waiting', 'pending', 'concluded', 'null']);
  const completed = events.find((e) => e.name === 'BLOCK_JOB_COMPLETED');
  assert.deepEqual(completed?.data, { type: 'backup', device: 'b0', len: 1 << 20, offset: 1 << 20, speed: 0 });
  assert.deepEqual(mgr.queryJobs(), []);
  assert.ok((await dst.read(0, 1 << 20)).equals(fill(1, 1 << 20)));
  // the filter left the graph
  assert.deepEqual([...g.nodes.keys()].sort(), ['dst', 'src']);
});

test('verbs in the wrong state fail with QEMU messages; ids are checked', async () => {
  const g = newGraph();
  const mgr = new JobManager(g);
  const src = await addNode(g, { driver: 'memory', size: 1 << 20, 'node-name': 'src' });
  const dst = await addNode(g, { driver: 'memory', size: 1 << 20, 'node-name': 'dst' });
  const dst2 = await addNode(g, { driver: 'memory', size: 1 << 20, 'node-name': 'dst2' });
  await assert.rejects(startBackup(mgr, { source: src, target: dst, sync: 'none' }), { message: 'An explicit job ID is required' });
  await assert.rejects(startBackup(mgr, { jobId: '0bad', source: src, target: dst, sync: 'none' }), { message: "Invalid job ID '0bad'" });
  const job = await startBackup(mgr, { jobId: 'j', source: src, target: dst, sync: 'none', autoDismiss: false });
  await assert.rejects(startBackup(mgr, { jobId: 'j', source: dst2, target: dst, sync: 'none' }), { message: "Job ID 'j' already in use" });
  // QEMU's backup blocks its target (and filter), not the source below the filter
  await assert.rejects(startBackup(mgr, { jobId: 'k', source: dst2, target: dst, sync: 'none' }), {
    message: "Node 'dst' is busy: block device is in use by block job: backup",
  });
  // two starts racing for one id: exactly one gets it; a failed start frees its id
  const e1 = await addNode(g, { driver: 'memory', size: 1 << 20, 'node-name': 'e1' });
  const e2 = await addNode(g, { driver: 'memory', size: 1 << 20, 'node-name': 'e2' });
  const e3 = await addNode(g, { driver: 'memory', size: 1 << 20, 'node-name': 'e3' });
  const race = await Promise.allSettled([
    startBackup(mgr, { jobId: 'r', source: e1, target: e2, sync: 'none' }),
    startBackup(mgr, { jobId: 'r', source: e3, target: dst2, sync: 'none' }),
  ]);
  assert.deepEqual(race.map((x) => x.status), ['fulfilled', 'rejected']);
  assert.equal(race[1]?.status === 'rejected' && (race[1].reason as Error).message, "Job ID 'r' already in use");
  // two jobs racing for one node: the second finds it busy
  const e4 = await addNode(g, { driver: 'memory', size: 1 << 20, 'node-name': 'e4' });
  const e5 = await addNode(g, { driver: 'memory', size: 1 << 20, 'node-name': 'e5' });
  const race2 = await Promise.allSettled([
    startMirror(mgr, { jobId: 'x1', source: e4, target: e5, sync: 'none' }),
    startBackup(mgr, { jobId: 'x2', source: e4, target: e5, sync: 'none' }),
  ]);
  assert.deepEqual(race2.map((x) => x.status), ['fulfilled', 'rejected']);
  assert.equal(race2[1]?.status === 'rejected' && (race2[1].reason as Error).message, "Node 'e4' is busy: block device is in use by block job: mirror");
  if (race2[0]?.status === 'fulfilled') await race2[0].value.cancel(true);
  assert.equal(e4.blockers.size, 0);
  const k = await startBackup(mgr, { jobId: 'k', source: e3, target: dst2, sync: 'none' });
  await k.cancel();
  if (race[0]?.status === 'fulfilled') await race[0].value.cancel();
  assert.throws(() => job.complete(), { message: "Job 'j' in state 'running' cannot accept command verb 'complete'" });
  await assert.rejects(job.finalize(), { message: "Job 'j' in state 'running' cannot accept command verb 'finalize'" });
  assert.throws(() => job.dismiss(), { message: "Job 'j' in state 'running' cannot accept command verb 'dismiss'" });
  assert.throws(() => job.resume(), { message: "Can't resume a job that was not paused" });
  job.pause();
  assert.throws(() => job.pause(), { message: 'Job is already paused' });
  assert.equal(mgr.queryBlockJobs()[0]?.paused, true);
  job.resume();
  assert.throws(() => job.setSpeed(-1), { message: "Invalid parameter 'speed'" });
  job.setSpeed(1 << 20);
  assert.equal(mgr.queryBlockJobs()[0]?.speed, 1 << 20);
  assert.throws(() => mgr.findBlockJob('nope'), { message: "Block job 'nope' not found" });
  assert.throws(() => mgr.find('nope'), { message: 'Job not found' });
  const r = await job.cancel();
  assert.equal(r.cancelled, true);
  assert.equal(r.ret === 0 ? 'ok' : r.ret.code, 'ECANCELED');
  // auto-dismiss off: concluded stays listed until dismissed
  assert.deepEqual(mgr.queryJobs(), [{ id: 'j', type: 'backup', status: 'concluded', 'current-progress': 0, 'total-progress': 0, error: 'Operation canceled' }]);
  assert.throws(() => job.userCancel(), { message: "Job 'j' in state 'concluded' cannot accept command verb 'cancel'" });
  job.dismiss();
  assert.deepEqual(mgr.queryJobs(), []);
});

test('query-block-jobs has QEMU BlockJobInfo fields; a job without a completion refuses complete', async () => {
  const g = newGraph();
  const mgr = new JobManager(g);
  const src = await addNode(g, { driver: 'memory', size: 1 << 20, 'node-name': 'src' });
  const dst = await addNode(g, { driver: 'memory', size: 1 << 20, 'node-name': 'dst' });
  const job = await startMirror(mgr, { jobId: 'm', source: src, target: dst, sync: 'none' });
  await nextEvent(mgr, 'BLOCK_JOB_READY');
  const info = mgr.queryBlockJobs()[0]!;
  assert.deepEqual(Object.keys(info).sort(), ['auto-dismiss', 'auto-finalize', 'busy', 'device', 'io-status', 'len', 'offset', 'paused', 'ready', 'speed', 'status', 'type'].sort());
  assert.equal(info.ready, true);
  assert.equal(info.status, 'ready');
  job.pause();
  assert.throws(() => job.complete(), { message: "The active block job 'm' cannot be completed" });
  job.resume();
  await job.cancel(true);
  const b = await startBackup(mgr, { jobId: 'b', source: src, target: dst, sync: 'none' });
  assert.throws(() => b.complete(), StateError);
  await b.cancel();
});

test('manual finalize: the job waits in pending and emits BLOCK_JOB_PENDING', async () => {
  const g = newGraph();
  const mgr = new JobManager(g);
  const events = recordEvents(mgr);
  const src = await addNode(g, { driver: 'memory', size: 256 << 10, 'node-name': 'src' });
  const dst = await addNode(g, { driver: 'memory', size: 256 << 10, 'node-name': 'dst' });
  const job = await startBackup(mgr, { jobId: 'f', source: src, target: dst, sync: 'full', autoFinalize: false, autoDismiss: false });
  const pend = await nextEvent(mgr, 'BLOCK_JOB_PENDING');
  assert.deepEqual(pend, { type: 'backup', id: 'f' });
  assert.equal(job.status, 'pending');
  await job.finalize();
  assert.equal(job.status, 'concluded');
  job.dismiss();
  assert.deepEqual(statuses(events, 'f'), ['created', 'running', 'waiting', 'pending', 'concluded', 'null']);
});

test('internal jobs are never listed and emit no events', async () => {
  const g = newGraph();
  const mgr = new JobManager(g);
  const events = recordEvents(mgr);
  const src = await addNode(g, { driver: 'memory', size: 256 << 10, 'node-name': 'src' });
  const dst = await addNode(g, { driver: 'memory', size: 256 << 10, 'node-name': 'dst' });
  let lastProgress = 0;
  const job = await startBackup(mgr, { internal: true, source: src, target: dst, sync: 'full', onProgress: (c) => (lastProgress = c) });
  assert.deepEqual(mgr.queryJobs(), []);
  assert.deepEqual(mgr.queryBlockJobs(), []);
  const r = await job.done;
  assert.equal(r.ret, 0);
  assert.equal(lastProgress, 256 << 10);
  assert.deepEqual(events, []);
});

test('cancelAll ends every job, internal ones included, and restores the graph', async () => {
  const g = newGraph();
  const mgr = new JobManager(g);
  const a = await addNode(g, { driver: 'memory', size: 1 << 20, 'node-name': 'a' });
  const b = await addNode(g, { driver: 'memory', size: 1 << 20, 'node-name': 'b' });
  const c = await addNode(g, { driver: 'memory', size: 1 << 20, 'node-name': 'c' });
  const d = await addNode(g, { driver: 'memory', size: 1 << 20, 'node-name': 'd' });
  const ea = g.createBackend(a, { name: 'ea' });
  const ec = g.createBackend(c, { name: 'ec' });
  const j1 = await startBackup(mgr, { internal: true, source: a, target: b, sync: 'none' });
  const j2 = await startMirror(mgr, { jobId: 'm', source: c, target: d, sync: 'none', autoDismiss: false });
  await mgr.cancelAll();
  assert.equal(j1.status, 'null');
  assert.equal(j2.status, 'null');
  assert.deepEqual(mgr.queryJobs(), []);
  assert.equal(ea.node, a);
  assert.equal(ec.node, c);
  assert.deepEqual([...g.nodes.keys()].sort(), ['a', 'b', 'c', 'd']);
});
