// The permission fuzz suite (issue 15, item 1): random QMP conversations over a small fixed
// vocabulary (nodes added by reference and inline, read-only or not; NBD exports writable or
// not; mirror, backup and commit with fixed job ids; cancel, complete, export-del,
// blockdev-del, block_resize), generated from a fixed seed. Each conversation goes to a fresh
// qemu-storage-daemon 7.2 and a fresh `lockstep daemon`, and every reply is compared exactly.
// Jobs are let settle (ready, or gone) after every job command on each side, so no reply
// depends on timing; the settled job list is compared too. After the daemons exit, a file
// that no command QEMU accepted could write is byte-identical to its template on both sides,
// and every raw file is the same on both sides.
// (block-stream is not in the vocabulary: lockstep has no such command.)

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, type ChildProcess } from 'node:child_process';
import { copyFileSync, mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { isDeepStrictEqual } from 'node:util';
import fc from 'fast-check';
import { tempDir } from '../helpers/graph.js';
import { startDaemon } from '../helpers/daemon.js';
import { requireTool } from '../helpers/tls.js';
import { Transcript, mask, startQsd, substitute, type Msg } from '../helpers/qmp-transcript.js';

const SEED = Number(process.env.PERM_FUZZ_SEED ?? 15);
/** two daemons started and stopped per run: 100 runs took 19 s at load 1, 200 took 59 s at load 14 (2 cores) */
const RUNS = Number(process.env.PERM_FUZZ_RUNS ?? 100);
const MiB = 1024 * 1024;

/** Each image (by its node's letter), what its format node is, and its file. */
const IMAGES = {
  a: { driver: 'raw', file: 'a.raw' },
  b: { driver: 'raw', file: 'b.raw' },
  base: { driver: 'qcow2', file: 'base.qcow2' },
  top: { driver: 'qcow2', file: 'top.qcow2' },
  c: { driver: 'qcow2', file: 'c.qcow2' },
} as const;
type Image = keyof typeof IMAGES;
const IMAGE_NAMES = Object.keys(IMAGES) as Image[];
/** Format nodes are named after their image, file nodes `f-IMAGE`; `nul` is a null-co node. */
const NODES = [...IMAGE_NAMES, ...IMAGE_NAMES.map((i) => `f-${i}`), 'nul'];
const JOB_IDS = ['jm', 'jb', 'jc'] as const;
const EXPORT_IDS = ['e0', 'e1'] as const;

function templates(dir: string): void {
  mkdirSync(dir, { recursive: true });
  const io = (fmt: string, f: string, ...cmds: string[]): void => {
    execFileSync('qemu-io', ['-f', fmt, ...cmds.flatMap((c) => ['-c', c]), join(dir, f)], { stdio: 'ignore' });
  };
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', join(dir, 'a.raw'), '1M']);
  io('raw', 'a.raw', 'write -P 0xa1 0 1M');
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', join(dir, 'b.raw'), '1M']);
  io('raw', 'b.raw', 'write -P 0xb2 0 512k');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', join(dir, 'base.qcow2'), '1M']);
  io('qcow2', 'base.qcow2', 'write -P 0x11 0 128k', 'write -P 0x12 512k 64k');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', join(dir, 'top.qcow2'), '1M']);
  io('qcow2', 'top.qcow2', 'write -P 0x22 64k 64k');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', join(dir, 'c.qcow2'), '1M']);
  io('qcow2', 'c.qcow2', 'write -P 0x33 256k 64k');
}

// ---- the vocabulary ----------------------------------------------------------------------

const node = fc.constantFrom(...NODES);
const image = fc.constantFrom(...IMAGE_NAMES);
const readOnly = fc.constantFrom<[boolean | undefined]>([undefined], [true], [false]).map(([r]) => (r === undefined ? {} : { 'read-only': r }));

/** a file node alone */
const addFile = fc.tuple(image, readOnly).map(([i, ro]): Msg => ({
  execute: 'blockdev-add',
  arguments: { driver: 'file', 'node-name': `f-${i}`, filename: `$D/${IMAGES[i].file}`, ...ro },
}));

/** a format node over its file: by reference, inline and named, or inline and unnamed */
const addFormat = fc
  .tuple(image, readOnly, fc.constantFrom('ref', 'inline-named', 'inline'), fc.constantFrom('ref', 'none', 'implicit'))
  .map(([i, ro, how, backing]): Msg => {
    const file =
      how === 'ref' ? `f-${i}` : { driver: 'file', filename: `$D/${IMAGES[i].file}`, ...(how === 'inline-named' ? { 'node-name': `f-${i}` } : {}) };
    // top.qcow2's backing: the node 'base', none, or opened from its header (implicit nodes)
    const back = i !== 'top' || backing === 'implicit' ? {} : { backing: backing === 'ref' ? 'base' : null };
    return { execute: 'blockdev-add', arguments: { driver: IMAGES[i].driver, 'node-name': i, file, ...ro, ...back } };
  });

const addNull = fc.constant<Msg>({ execute: 'blockdev-add', arguments: { driver: 'null-co', 'node-name': 'nul', size: MiB, 'read-zeroes': true } });

const exportAdd = fc.tuple(fc.constantFrom(...EXPORT_IDS), node, fc.boolean(), fc.boolean()).map(([id, n, writable, named]): Msg => ({
  execute: 'block-export-add',
  arguments: { type: 'nbd', id, 'node-name': n, writable, ...(named ? { name: id } : {}) },
}));
const exportDel = fc.constantFrom(...EXPORT_IDS).map((id): Msg => ({ execute: 'block-export-del', arguments: { id } }));
const blockdevDel = node.map((n): Msg => ({ execute: 'blockdev-del', arguments: { 'node-name': n } }));
const resize = fc.tuple(node, fc.constantFrom(2 * MiB, MiB)).map(([n, size]): Msg => ({ execute: 'block_resize', arguments: { 'node-name': n, size } }));

const mirror = fc.tuple(node, node, fc.constantFrom('full', 'top', 'none')).map(([device, target, sync]): Msg => ({
  execute: 'blockdev-mirror',
  arguments: { 'job-id': 'jm', device, target, sync },
}));
const backup = fc.tuple(node, node, fc.constantFrom('full', 'top', 'none')).map(([device, target, sync]): Msg => ({
  execute: 'blockdev-backup',
  arguments: { 'job-id': 'jb', device, target, sync },
}));
/** top.qcow2 over base.qcow2 is the only chain: an active commit, by default or named base */
const commit = fc.tuple(fc.constantFrom('top', 'base', 'a'), fc.boolean()).map(([device, named]): Msg => ({
  execute: 'block-commit',
  arguments: { 'job-id': 'jc', device, ...(named ? { 'base-node': 'base' } : {}) },
}));
const cancel = fc.tuple(fc.constantFrom(...JOB_IDS), fc.boolean()).map(([device, force]): Msg => ({ execute: 'block-job-cancel', arguments: { device, force } }));
const complete = fc.constantFrom('jm', 'jc').map((device): Msg => ({ execute: 'block-job-complete', arguments: { device } }));

const step = fc.oneof(
  { arbitrary: addFile, weight: 4 },
  { arbitrary: addFormat, weight: 6 },
  { arbitrary: addNull, weight: 1 },
  { arbitrary: exportAdd, weight: 3 },
  { arbitrary: exportDel, weight: 1 },
  { arbitrary: blockdevDel, weight: 2 },
  { arbitrary: resize, weight: 2 },
  { arbitrary: mirror, weight: 3 },
  { arbitrary: backup, weight: 2 },
  { arbitrary: commit, weight: 2 },
  { arbitrary: cancel, weight: 2 },
  { arbitrary: complete, weight: 1 },
);
const conversation = fc.array(step, { minLength: 6, maxLength: 18 });

const PRELUDE: Msg[] = [{ execute: 'qmp_capabilities' }, { execute: 'nbd-server-start', arguments: { addr: { type: 'unix', data: { path: '$D/nbd.sock' } } } }];

const JOB_COMMANDS = new Set(['blockdev-mirror', 'blockdev-backup', 'block-commit', 'block-job-cancel', 'block-job-complete']);

// ---- running a conversation ----------------------------------------------------------------

interface JobInfo {
  device: string;
  type: string;
  status: string;
  ready: boolean;
}

/**
 * Waits until every job is ready or gone (a backup with sync=none runs until cancelled, so
 * running is settled for it), and `ending` (a job told to complete or cancel) gone, and
 * returns the jobs as they stand; a job that does not settle within 20 s is reported as it
 * was, and the comparison shows it.
 */
async function settle(t: Transcript, endless: ReadonlySet<string>, ending: string | null): Promise<Msg> {
  let jobs: JobInfo[] = [];
  for (let i = 0; i < 800; i++) {
    jobs = (await t.reply({ execute: 'query-block-jobs' })).return as JobInfo[];
    const steady = (j: JobInfo): boolean => j.device !== ending && (j.ready || (j.status === 'running' && endless.has(j.device)));
    if (jobs.every(steady)) break;
    await new Promise((r) => setTimeout(r, 25));
  }
  return { settled: jobs.map((j) => ({ device: j.device, type: j.type, status: j.status, ready: j.ready })).sort((x, y) => x.device.localeCompare(y.device)) };
}

/** Paths and QEMU's implicit node names (#block plus a counter and two random digits) masked. */
function normalise(m: Msg, dir: string): Msg {
  return JSON.parse(JSON.stringify(mask(m, dir)).replace(/#block\d+/g, '#block')) as Msg;
}

async function converse(path: string, dir: string, steps: Msg[]): Promise<Msg[]> {
  const t = await Transcript.open(path);
  const endless = new Set<string>();
  try {
    const out: Msg[] = [];
    for (const req of [...PRELUDE, ...steps]) {
      const reply = normalise(await t.reply(substitute(req, dir) as Msg), dir);
      out.push(reply);
      if (req.execute === 'blockdev-backup' && 'return' in reply) {
        if ((req.arguments as Msg).sync === 'none') endless.add('jb');
        else endless.delete('jb');
      }
      const ending = 'return' in reply && (req.execute === 'block-job-cancel' || req.execute === 'block-job-complete') ? String((req.arguments as Msg).device) : null;
      if (JOB_COMMANDS.has(req.execute as string)) out.push(await settle(t, endless, ending));
    }
    return out;
  } finally {
    t.close();
  }
}

function exited(proc: ChildProcess): Promise<void> {
  return new Promise((r) => (proc.exitCode !== null || proc.signalCode !== null ? r() : proc.once('exit', () => r())));
}

/** The images a command QEMU accepted may have written or resized. */
function written(steps: Msg[], replies: Msg[]): Set<Image> {
  const out = new Set<Image>();
  const imageOf = (n: unknown): Image | null => {
    const s = String(n).replace(/^f-/, '');
    return (IMAGE_NAMES as string[]).includes(s) ? (s as Image) : null;
  };
  const mark = (n: unknown): void => {
    const i = imageOf(n);
    if (i) out.add(i);
  };
  let r = PRELUDE.length;
  for (const s of steps) {
    const ok = 'return' in replies[r]!;
    const a = (s.arguments ?? {}) as Record<string, unknown>;
    r += JOB_COMMANDS.has(s.execute as string) ? 2 : 1;
    if (!ok) continue;
    if (s.execute === 'blockdev-mirror' || s.execute === 'blockdev-backup') mark(a.target);
    if (s.execute === 'block-commit') {
      mark('base');
      mark('top');
    }
    if (s.execute === 'block_resize') mark(a['node-name']);
  }
  return out;
}

test('permission fuzz: random QMP conversations get the same replies from QEMU 7.2 and lockstep, and refused writes change no file', async (t) => {
  if (!requireTool(t, 'qemu-storage-daemon', ['--version']) || !requireTool(t, 'qemu-img', ['--version']) || !requireTool(t, 'qemu-io', ['--version'])) return;
  const root = tempDir(t);
  const tpl = join(root, 'templates');
  templates(tpl);
  let run = 0;
  let refusals = 0;
  await fc.assert(
    fc.asyncProperty(conversation, async (steps) => {
      const dir = join(root, `run-${++run}`);
      const qdir = join(dir, 'q');
      const ldir = join(dir, 'l');
      for (const d of [qdir, ldir]) {
        mkdirSync(d, { recursive: true });
        for (const { file } of Object.values(IMAGES)) copyFileSync(join(tpl, file), join(d, file));
      }
      const cleanups: Array<() => unknown> = [];
      const qsd = await startQsd(qdir);
      try {
        const d = await startDaemon({ after: (fn) => cleanups.push(fn) }, ldir, []);
        const [theirs, ours] = await Promise.all([converse(qsd.path, qdir, steps), converse(d.qmpPath, ldir, steps)]);
        qsd.proc.kill('SIGTERM');
        await Promise.all([exited(qsd.proc), d.stop()]);
        const requests = [...PRELUDE, ...steps].flatMap((s) => (JOB_COMMANDS.has(s.execute as string) ? [s, { settle: s.execute }] : [s]));
        for (let i = 0; i < requests.length; i++) {
          // PERM_FUZZ_ALL=1 lists the first difference of every run instead of stopping at one
          if (process.env.PERM_FUZZ_ALL && !isDeepStrictEqual(ours[i], theirs[i])) {
            console.log(`run ${run} step ${i}: ${JSON.stringify(requests[i])}\n  Q ${JSON.stringify(theirs[i])}\n  L ${JSON.stringify(ours[i])}\n  conversation: ${JSON.stringify(steps)}`);
            return;
          }
          assert.deepEqual(ours[i], theirs[i], `run ${run} step ${i}: ${JSON.stringify(requests[i])}\nconversation: ${JSON.stringify(steps)}`);
        }
        refusals += theirs.filter((m) => 'error' in m).length;
        const changed = written(steps, theirs);
        for (const i of IMAGE_NAMES) {
          const f = IMAGES[i].file;
          const q = readFileSync(join(qdir, f));
          const l = readFileSync(join(ldir, f));
          if (!changed.has(i)) {
            const before = readFileSync(join(tpl, f));
            assert.ok(q.equals(before), `run ${run}: QEMU changed ${f}, which no accepted command writes\nconversation: ${JSON.stringify(steps)}`);
            assert.ok(l.equals(before), `run ${run}: lockstep changed ${f}, which QEMU let no command write\nconversation: ${JSON.stringify(steps)}`);
          } else if (IMAGES[i].driver === 'raw') {
            assert.ok(l.equals(q), `run ${run}: ${f} differs (${l.length} bytes here, ${q.length} in QEMU's)\nconversation: ${JSON.stringify(steps)}`);
          }
        }
      } finally {
        qsd.proc.kill('SIGKILL');
        for (const fn of cleanups) await fn();
      }
    }),
    { seed: SEED, numRuns: RUNS, endOnFailure: !process.env.PERM_FUZZ_SHRINK, includeErrorInReport: true },
  );
  // the generator reaches refusals, not only successes
  assert.ok(refusals >= RUNS, `only ${refusals} refusals in ${RUNS} conversations`);
});
