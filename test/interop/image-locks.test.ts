// Image locks follow the permissions the graph holds, as QEMU's do. The same states are set
// up by QMP in qemu-storage-daemon 7.2 and in `lockstep daemon` (a file node nobody uses, a
// raw image exported read-only and writable, a qcow2 read-write and read-only, a mirror's
// target); then:
// - QEMU's tools (qemu-img info, qemu-io write, qemu-io -r read) probe lockstep's images and
//   must get exactly what they get from QEMU's (refused with the same words, or let in);
// - lockstep's tools (lockstep img info, lockstep io) probe QEMU's images and must refuse
//   and be let in exactly where qemu-img and qemu-io are, with the same message.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { tempDir } from '../helpers/graph.js';
import { startDaemon } from '../helpers/daemon.js';
import { requireTool } from '../helpers/tls.js';
import { Transcript, startQsd, substitute, type Msg } from '../helpers/qmp-transcript.js';
import { loadNative } from '../../src/util/native.js';

const LOCKSTEP = resolve('bin/lockstep');

interface State {
  file: string;
  fmt: 'raw' | 'qcow2';
  setup: Msg[];
}

const STATES: State[] = [
  { file: 'alone.raw', fmt: 'raw', setup: [{ execute: 'blockdev-add', arguments: { driver: 'file', 'node-name': 'alone', filename: '$D/alone.raw' } }] },
  {
    file: 'ro-export.raw',
    fmt: 'raw',
    setup: [
      { execute: 'blockdev-add', arguments: { driver: 'raw', 'node-name': 'roe', file: { driver: 'file', filename: '$D/ro-export.raw' } } },
      { execute: 'block-export-add', arguments: { type: 'nbd', id: 'roe', 'node-name': 'roe', writable: false } },
    ],
  },
  {
    file: 'rw-export.raw',
    fmt: 'raw',
    setup: [
      { execute: 'blockdev-add', arguments: { driver: 'raw', 'node-name': 'rwe', file: { driver: 'file', filename: '$D/rw-export.raw' } } },
      { execute: 'block-export-add', arguments: { type: 'nbd', id: 'rwe', 'node-name': 'rwe', writable: true } },
    ],
  },
  { file: 'rw.qcow2', fmt: 'qcow2', setup: [{ execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'rwq', file: { driver: 'file', filename: '$D/rw.qcow2' } } }] },
  {
    file: 'ro.qcow2',
    fmt: 'qcow2',
    setup: [{ execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'roq', 'read-only': true, file: { driver: 'file', filename: '$D/ro.qcow2' } } }],
  },
  {
    file: 'target.raw',
    fmt: 'raw',
    setup: [
      { execute: 'blockdev-add', arguments: { driver: 'null-co', 'node-name': 'src', size: 1048576 } },
      { execute: 'blockdev-add', arguments: { driver: 'raw', 'node-name': 'tgt', file: { driver: 'file', filename: '$D/target.raw' } } },
      { execute: 'blockdev-mirror', arguments: { 'job-id': 'j0', device: 'src', target: 'tgt', sync: 'full' } },
    ],
  },
];

const SERVER: Msg[] = [{ execute: 'qmp_capabilities' }, { execute: 'nbd-server-start', arguments: { addr: { type: 'unix', data: { path: '$D/nbd.sock' } } } }];

function prepare(dir: string): void {
  mkdirSync(dir, { recursive: true });
  for (const s of STATES) execFileSync('qemu-img', ['create', '-q', '-f', s.fmt, join(dir, s.file), '1M']);
}

async function setUp(path: string, dir: string): Promise<void> {
  const t = await Transcript.open(path);
  try {
    for (const req of [...SERVER, ...STATES.flatMap((s) => s.setup)]) {
      const r = await t.reply(substitute(req, dir) as Msg);
      assert.ok('return' in r, `${JSON.stringify(req)}: ${JSON.stringify(r)}`);
    }
  } finally {
    t.close();
  }
}

interface Outcome {
  status: number | null;
  /** stderr without the program name and with the directory masked */
  stderr: string;
}

function run(cmd: string, args: string[], dir: string): Outcome {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 30_000 });
  const stderr = r.stderr
    .split(dir)
    .join('$D')
    .replace(/^(qemu-img|qemu-io|lockstep img|lockstep io): /gm, '');
  return { status: r.status, stderr };
}

/** The probes, with QEMU's tools, or with lockstep's when `lockstep` is set. */
function probes(dir: string, s: State, lockstep: boolean): Record<string, Outcome> {
  const img = join(dir, s.file);
  const io = (args: string[]): Outcome => (lockstep ? run(process.execPath, [LOCKSTEP, 'io', ...args], dir) : run('qemu-io', args, dir));
  const info = lockstep ? run(process.execPath, [LOCKSTEP, 'img', 'info', '-f', s.fmt, img], dir) : run('qemu-img', ['info', '-f', s.fmt, img], dir);
  return {
    info: { status: info.status, stderr: info.stderr },
    write: io(['-f', s.fmt, '-c', 'write 0 512', img]),
    read: io(['-r', '-f', s.fmt, '-c', 'read 0 512', img]),
    'read -U': io(['-r', '-U', '-f', s.fmt, '-c', 'read 0 512', img]),
  };
}

test('image locks: QEMU tools meet lockstep exactly as they meet QEMU, and lockstep tools meet QEMU as QEMU tools do', async (t) => {
  if (!loadNative() && !process.env.CI) return t.skip('cross-process image locks need the native helper (src/util/native.ts)');
  for (const tool of ['qemu-storage-daemon', 'qemu-img', 'qemu-io']) if (!requireTool(t, tool, ['--version'])) return;
  const root = tempDir(t);
  const qdir = join(root, 'q');
  const ldir = join(root, 'l');
  prepare(qdir);
  prepare(ldir);

  const qsd = await startQsd(qdir);
  t.after(() => qsd.proc.kill('SIGKILL'));
  await setUp(qsd.path, qdir);
  const d = await startDaemon(t, ldir, []);
  await setUp(d.qmpPath, ldir);

  let refusals = 0;
  for (const s of STATES) {
    const againstQemu = probes(qdir, s, false);
    const againstLockstep = probes(ldir, s, false);
    const lockstepAgainstQemu = probes(qdir, s, true);
    for (const [name, q] of Object.entries(againstQemu)) {
      if (q.status !== 0) refusals++;
      assert.deepEqual(againstLockstep[name], q, `${s.file}: ${name} by QEMU's tool, lockstep holding it`);
      const l = lockstepAgainstQemu[name]!;
      assert.equal(l.status, q.status, `${s.file}: ${name} by lockstep's tool, QEMU holding it: ${l.stderr}`);
      // refusals are worded alike (what follows differs between the tools' error prefixes)
      if (q.status !== 0) assert.equal(lockMessage(l.stderr), lockMessage(q.stderr), `${s.file}: ${name}`);
    }
  }
  assert.ok(refusals >= 6, `the states refuse something (${refusals} refusals)`);
});

/** The "Failed to get ... lock" line and its hint, whatever the tool's open-error prefix. */
function lockMessage(stderr: string): string {
  const m = /Failed to get [^\n]*lock\nIs another process using the image \[[^\n]*\]\?/.exec(stderr);
  return m ? m[0] : stderr;
}
