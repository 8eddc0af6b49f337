// Permission conflicts over QMP: the same conversation sent to qemu-storage-daemon 7.2 and to
// `lockstep daemon`, every reply compared exactly (events aside, they are checked elsewhere).
// A mirror onto a node exported writable, a second writable export of one node, a job's
// target exported, a second qcow2 on a file in use (by node and by file name), a reader
// beside a writer, a resize under users that share none: QEMU's refusals word for word, and
// what QEMU accepts accepted. The steps after "found by test/fuzz/permissions.test.ts" are
// the fuzz suite's findings, kept as regressions.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from '../helpers/graph.js';
import { startDaemon } from '../helpers/daemon.js';
import { requireTool } from '../helpers/tls.js';
import { Transcript, mask, startQsd, substitute, type Msg } from '../helpers/qmp-transcript.js';

const CONVERSATION: Msg[] = [
  { execute: 'qmp_capabilities' },
  { execute: 'blockdev-add', arguments: { driver: 'null-co', 'node-name': 'src', size: 1048576 } },
  { execute: 'blockdev-add', arguments: { driver: 'file', 'node-name': 'tgt-file', filename: '$D/t.raw' } },
  { execute: 'blockdev-add', arguments: { driver: 'raw', 'node-name': 'tgt', file: 'tgt-file' } },
  { execute: 'nbd-server-start', arguments: { addr: { type: 'unix', data: { path: '$D/nbd.sock' } } } },
  { execute: 'block-export-add', arguments: { type: 'nbd', id: 'e0', 'node-name': 'tgt', writable: true } },
  // mirror onto a node exported writable: the client's disk would be overwritten
  { execute: 'blockdev-mirror', arguments: { 'job-id': 'j0', device: 'src', target: 'tgt', sync: 'full' } },
  // a second writable export of the same node: exports share everything
  { execute: 'block-export-add', arguments: { type: 'nbd', id: 'e1', 'node-name': 'tgt', name: 'second', writable: true } },
  { execute: 'query-block-jobs' },
  // a job's target, exported afterwards
  { execute: 'blockdev-add', arguments: { driver: 'file', 'node-name': 'tgt2-file', filename: '$D/t2.raw' } },
  { execute: 'blockdev-add', arguments: { driver: 'raw', 'node-name': 'tgt2', file: 'tgt2-file' } },
  { execute: 'blockdev-mirror', arguments: { 'job-id': 'j1', device: 'src', target: 'tgt2', sync: 'full' } },
  { execute: 'block-export-add', arguments: { type: 'nbd', id: 'e2', 'node-name': 'tgt2', writable: true } },
  { execute: 'block-export-add', arguments: { type: 'nbd', id: 'e3', 'node-name': 'tgt2', writable: false } },
  // the file under the target: the raw node passes the job's needs down
  { execute: 'block-export-add', arguments: { type: 'nbd', id: 'e4', 'node-name': 'tgt2-file', writable: false } },
  // a second qcow2 on a file in use: through the same file node, and through a new one
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'q1', file: { driver: 'file', 'node-name': 'cf', filename: '$D/c.qcow2' } } },
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'q2', file: 'cf' } },
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'q3', 'read-only': true, file: 'cf' } },
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'q4', file: { driver: 'file', filename: '$D/c.qcow2' } } },
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'q5', 'read-only': true, file: { driver: 'file', filename: '$D/c.qcow2' } } },
  // the qcow2's file exported: nobody writes under a format
  { execute: 'block-export-add', arguments: { type: 'nbd', id: 'e5', 'node-name': 'cf', writable: true } },
  // two readers of one image are fine
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'r1', 'read-only': true, file: { driver: 'file', filename: '$D/d.qcow2' } } },
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'r2', 'read-only': true, file: { driver: 'file', filename: '$D/d.qcow2' } } },
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'r3', file: { driver: 'file', filename: '$D/d.qcow2' } } },
  // resize: refused where a user shares no resize (a job's target, a format's file), the
  // job's own nodes are busy, an NBD export shares no resize either; a node nobody uses grows
  { execute: 'block_resize', arguments: { 'node-name': 'tgt2-file', size: 2097152 } },
  { execute: 'block_resize', arguments: { 'node-name': 'cf', size: 2097152 } },
  { execute: 'block_resize', arguments: { 'node-name': 'tgt2', size: 2097152 } },
  { execute: 'block_resize', arguments: { 'node-name': 'nothere', size: 2097152 } },
  { execute: 'block_resize', arguments: { 'node-name': 'tgt-file', size: -1 } },
  { execute: 'block_resize', arguments: { 'node-name': 'tgt-file', size: 2097152 } },
  { execute: 'blockdev-add', arguments: { driver: 'file', 'node-name': 'free', filename: '$D/s.raw' } },
  { execute: 'block_resize', arguments: { 'node-name': 'free', size: 2097152 } },
  // ---- found by test/fuzz/permissions.test.ts ----
  // an export names a node, never a device
  { execute: 'block-export-add', arguments: { type: 'nbd', id: 'e6', 'node-name': 'nothere' } },
  // a read-only node has no writer: a writable format above it, a writable export, job targets
  { execute: 'blockdev-add', arguments: { driver: 'file', 'node-name': 'rof', filename: '$D/e.qcow2', 'read-only': true } },
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'q6', file: 'rof' } },
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'q7', file: 'rof', 'read-only': true } },
  { execute: 'block-export-add', arguments: { type: 'nbd', id: 'e6', 'node-name': 'q7', writable: true } },
  { execute: 'blockdev-add', arguments: { driver: 'file', 'node-name': 'ro', filename: '$D/ro.raw', 'read-only': true } },
  { execute: 'blockdev-add', arguments: { driver: 'null-co', 'node-name': 'src2', size: 1048576 } },
  { execute: 'blockdev-mirror', arguments: { 'job-id': 'j2', device: 'src2', target: 'ro', sync: 'full' } },
  { execute: 'blockdev-backup', arguments: { 'job-id': 'j3', device: 'src2', target: 'ro', sync: 'full' } },
  // a writable raw over a read-only file cannot grow it
  { execute: 'blockdev-add', arguments: { driver: 'raw', 'node-name': 'rr', file: 'ro' } },
  { execute: 'block_resize', arguments: { 'node-name': 'rr', size: 2097152 } },
  // a backing that cannot be opened; a format's file is opened before the format is named,
  // and an inline file refused at attach is closed again (its name is free)
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'q8', file: { driver: 'file', filename: '$D/t.qcow2' }, backing: 'nothere' } },
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'q1', file: { driver: 'file', 'node-name': 'cf', filename: '$D/c.qcow2' } } },
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'q9', file: { driver: 'file', 'node-name': 'cf2', filename: '$D/c.qcow2' } } },
  { execute: 'blockdev-del', arguments: { 'node-name': 'cf2' } },
  // mirror: the source must be a root before the target is looked up. backup: sizes must
  // be equal (mirror's fail its job: at the end)
  { execute: 'blockdev-mirror', arguments: { 'job-id': 'j4', device: 'tgt-file', target: 'nothere', sync: 'full' } },
  { execute: 'blockdev-add', arguments: { driver: 'file', 'node-name': 'big', filename: '$D/big.raw' } },
  { execute: 'blockdev-backup', arguments: { 'job-id': 'j5', device: 'src2', target: 'big', sync: 'full' } },
  // commit: node names only, and the base must be below the top
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'base', file: { driver: 'file', filename: '$D/b.qcow2' } } },
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'top', file: { driver: 'file', filename: '$D/t.qcow2' }, backing: 'base' } },
  { execute: 'block-commit', arguments: { 'job-id': 'j6', device: 'top', 'base-node': 'nothere' } },
  { execute: 'block-commit', arguments: { 'job-id': 'j6', device: 'top', 'base-node': 'free' } },
  // a backing node is blocked for resize, deletion and mirror
  { execute: 'block_resize', arguments: { 'node-name': 'base', size: 2097152 } },
  { execute: 'blockdev-del', arguments: { 'node-name': 'base' } },
  { execute: 'blockdev-mirror', arguments: { 'job-id': 'j7', device: 'src2', target: 'base', sync: 'full' } },
  // a backup's source sits below its filter: in use, not busy
  { execute: 'blockdev-add', arguments: { driver: 'file', 'node-name': 'bsrc', filename: '$D/bs.raw' } },
  { execute: 'blockdev-add', arguments: { driver: 'file', 'node-name': 'btgt', filename: '$D/bt.raw' } },
  { execute: 'blockdev-backup', arguments: { 'job-id': 'j8', device: 'bsrc', target: 'btgt', sync: 'none' } },
  { execute: 'blockdev-del', arguments: { 'node-name': 'bsrc' } },
  { execute: 'blockdev-del', arguments: { 'node-name': 'btgt' } },
  // a node a job holds is not a root
  { execute: 'blockdev-mirror', arguments: { 'job-id': 'j10', device: 'btgt', target: 'nothere', sync: 'full' } },
  { execute: 'block-job-cancel', arguments: { device: 'j8', force: true } },
  // a backup whose target writes into its source: the filter lets nobody write the source
  { execute: 'blockdev-add', arguments: { driver: 'file', 'node-name': 'self', filename: '$D/self.raw' } },
  { execute: 'blockdev-add', arguments: { driver: 'raw', 'node-name': 'self-raw', file: 'self' } },
  { execute: 'blockdev-backup', arguments: { 'job-id': 'j11', device: 'self', target: 'self-raw', sync: 'full' } },
  { execute: 'blockdev-backup', arguments: { 'job-id': 'j11', device: 'self-raw', target: 'self', sync: 'none' } },
  // an exported node is in use, whoever owns it
  { execute: 'blockdev-add', arguments: { driver: 'raw', 'node-name': 'own', file: { driver: 'file', 'node-name': 'own-file', filename: '$D/own.raw' } } },
  { execute: 'block-export-add', arguments: { type: 'nbd', id: 'e7', 'node-name': 'own-file' } },
  { execute: 'blockdev-del', arguments: { 'node-name': 'own-file' } },
  // accepted, and the job fails at its start: nothing below uses its nodes
  { execute: 'blockdev-mirror', arguments: { 'job-id': 'j9', device: 'src2', target: 'big', sync: 'full' } },
  { execute: 'block-job-cancel', arguments: { device: 'j1', force: true } },
];

function prepare(dir: string): void {
  mkdirSync(dir, { recursive: true });
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', join(dir, 't.raw'), '1M']);
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', join(dir, 't2.raw'), '1M']);
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', join(dir, 's.raw'), '1M']);
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', join(dir, 'c.qcow2'), '1M']);
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', join(dir, 'd.qcow2'), '1M']);
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', join(dir, 'e.qcow2'), '1M']);
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', join(dir, 'ro.raw'), '1M']);
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', join(dir, 'big.raw'), '2M']);
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', join(dir, 'bs.raw'), '1M']);
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', join(dir, 'bt.raw'), '1M']);
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', join(dir, 'self.raw'), '1M']);
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', join(dir, 'own.raw'), '1M']);
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', join(dir, 'b.qcow2'), '1M']);
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'b.qcow2', '-F', 'qcow2', join(dir, 't.qcow2'), '1M']);
}

async function converse(path: string, dir: string): Promise<Msg[]> {
  const t = await Transcript.open(path);
  try {
    const out: Msg[] = [];
    // paths, and the names of implicit nodes (QEMU's end in two random digits)
    const norm = (m: Msg): Msg => JSON.parse(JSON.stringify(mask(m, dir)).replace(/#block\d+/g, '#block')) as Msg;
    for (const req of CONVERSATION) out.push(norm(await t.reply(substitute(req, dir) as Msg)));
    return out;
  } finally {
    t.close();
  }
}

test('permission conflicts: the same QMP conversation gets the same replies from QEMU 7.2 and lockstep', async (t) => {
  if (!requireTool(t, 'qemu-storage-daemon', ['--version']) || !requireTool(t, 'qemu-img', ['--version'])) return;
  const root = tempDir(t);
  const qdir = join(root, 'q');
  const ldir = join(root, 'l');
  prepare(qdir);
  prepare(ldir);
  const qsd = await startQsd(qdir);
  let theirs: Msg[];
  try {
    theirs = await converse(qsd.path, qdir);
  } finally {
    qsd.proc.kill('SIGKILL');
  }
  const d = await startDaemon(t, ldir, []);
  const ours = await converse(d.qmpPath, ldir);
  if (process.env.PERM_TEST_DUMP) for (let i = 0; i < CONVERSATION.length; i++) console.log(JSON.stringify(CONVERSATION[i]), '\n  Q', JSON.stringify(theirs[i]), '\n  L', JSON.stringify(ours[i]));
  for (let i = 0; i < CONVERSATION.length; i++) {
    assert.deepEqual(ours[i], theirs[i], `step ${i}: ${JSON.stringify(CONVERSATION[i])}`);
  }
  assert.ok(theirs.filter((m) => 'error' in m).length >= 10, 'the conversation is mostly refusals');
  // the allowed resize happened on both sides, the refused ones nowhere
  for (const [f, size] of [['s.raw', 2 * 1048576], ['t.raw', 1048576], ['t2.raw', 1048576], ['ro.raw', 1048576], ['big.raw', 2 * 1048576]] as const) {
    assert.equal(statSync(join(qdir, f)).size, size, `QEMU's ${f}`);
    assert.equal(statSync(join(ldir, f)).size, size, `lockstep's ${f}`);
  }
});
