// blockdev-create over QMP, side by side with QEMU 7.2 (qemu-system-x86_64 -machine none):
// the same conversation goes to both, and every step's messages (events and the reply, in
// the order they arrive, timestamps stripped, temp dirs masked) must be identical; so must
// the files created, byte for byte. Then qemu-img check accepts lockstep's images, and an
// image created over QMP works as a qcow2 node.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { connect, type Socket } from 'node:net';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from '../helpers/graph.js';
import { startDaemon } from '../helpers/daemon.js';
import { requireTool } from '../helpers/tls.js';

type Msg = Record<string, unknown>;

/** A line-level QMP client that keeps every message in arrival order. */
class Transcript {
  private buf = '';
  private readonly queue: Msg[] = [];
  private waiter: (() => void) | null = null;
  private constructor(private readonly sock: Socket) {
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => {
      this.buf += d;
      for (let i = this.buf.indexOf('\n'); i >= 0; i = this.buf.indexOf('\n')) {
        const line = this.buf.slice(0, i).trim();
        this.buf = this.buf.slice(i + 1);
        if (line) this.queue.push(JSON.parse(line) as Msg);
      }
      this.waiter?.();
    });
  }

  static async open(path: string): Promise<Transcript> {
    const sock = connect(path);
    await new Promise<void>((resolve, reject) => sock.once('connect', resolve).once('error', reject));
    const t = new Transcript(sock);
    await t.next(); // greeting
    return t;
  }

  private async next(): Promise<Msg> {
    for (let i = 0; i < 400 && this.queue.length === 0; i++) {
      await new Promise<void>((r) => {
        const timer = setTimeout(r, 50);
        this.waiter = () => {
          clearTimeout(timer);
          r();
        };
      });
    }
    const m = this.queue.shift();
    if (!m) throw new Error('no QMP message within 20 s');
    return m;
  }

  /**
   * Sends one request and returns the messages up to its reply, and, when it started a job
   * (blockdev-create answered with return), on until that job's 'concluded' event.
   */
  async step(request: Msg): Promise<Msg[]> {
    this.sock.write(JSON.stringify(request) + '\n');
    const out: Msg[] = [];
    for (;;) {
      const m = await this.next();
      delete m.timestamp;
      out.push(m);
      if (!('event' in m)) break;
    }
    const args = request.arguments as Msg | undefined;
    if (request.execute === 'blockdev-create' && 'return' in out[out.length - 1]!) {
      const concluded = (m: Msg) => m.event === 'JOB_STATUS_CHANGE' && (m.data as Msg).id === args!['job-id'] && (m.data as Msg).status === 'concluded';
      while (!out.some(concluded)) {
        const m = await this.next();
        delete m.timestamp;
        out.push(m);
      }
    }
    return out;
  }

  close(): void {
    this.sock.destroy();
  }
}

/** QEMU's system emulator without a machine, or qemu-storage-daemon: the two answer alike. */
async function startQemu(dir: string, kind: 'system' | 'qsd'): Promise<{ path: string; proc: ChildProcess }> {
  const path = join(dir, 'qemu.qmp');
  const proc =
    kind === 'system'
      ? spawn('qemu-system-x86_64', ['-machine', 'none', '-nodefaults', '-display', 'none', '-qmp', `unix:${path},server=on,wait=off`], {
          stdio: 'ignore',
        })
      : spawn('qemu-storage-daemon', ['--chardev', `socket,id=m0,path=${path},server=on,wait=off`, '--monitor', 'chardev=m0'], {
          stdio: 'ignore',
        });
  for (let i = 0; i < 200 && !existsSync(path); i++) await new Promise((r) => setTimeout(r, 50));
  return { path, proc };
}

const MiB = 1024 * 1024;

/** The conversation; `$D` is the side's own directory. */
function conversation(): Msg[] {
  const create = (id: string, options: Msg, extra: Msg = {}): Msg => ({ execute: 'blockdev-create', arguments: { 'job-id': id, options, ...extra } });
  const dismiss = (id: string): Msg => ({ execute: 'job-dismiss', arguments: { id } });
  const query: Msg = { execute: 'query-jobs' };
  /** a create that fails or succeeds, then query-jobs and job-dismiss */
  const run = (id: string, options: Msg): Msg[] => [create(id, options), query, dismiss(id)];
  return [
    { execute: 'qmp_capabilities' },
    // the supervisor's sequence: file of size 0, node on it, qcow2 on the node
    create('c1', { driver: 'file', filename: '$D/a.qcow2', size: 0 }),
    query,
    { execute: 'query-block-jobs' },
    { execute: 'block-job-cancel', arguments: { device: 'c1' } },
    { execute: 'job-cancel', arguments: { id: 'c1' } },
    create('c1', { driver: 'file', filename: '$D/other', size: 0 }),
    dismiss('c1'),
    dismiss('c1'),
    { execute: 'blockdev-add', arguments: { driver: 'file', 'node-name': 'f1', filename: '$D/a.qcow2' } },
    create('c2', { driver: 'qcow2', file: 'f1', size: 64 * MiB }),
    query,
    dismiss('c2'),
    { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'q1', file: 'f1' } },
    // a format on the node refuses to share write/resize
    ...run('c3', { driver: 'qcow2', file: 'f1', size: MiB }),
    // and the image it writes is locked: a file creation on it is refused, not truncated
    ...run('c4', { driver: 'file', filename: '$D/a.qcow2', size: 0 }),
    { execute: 'blockdev-del', arguments: { 'node-name': 'q1' } },
    { execute: 'blockdev-del', arguments: { 'node-name': 'f1' } },
    // file: existing files are emptied and resized, preallocation modes
    ...run('f1', { driver: 'file', filename: '$D/big.raw', size: 8192 }),
    ...run('f2', { driver: 'file', filename: '$D/odd.raw', size: 1000, preallocation: 'full' }),
    ...run('f3', { driver: 'file', filename: '$D/fa.raw', size: 3 * MiB + 512, preallocation: 'falloc', nocow: true }),
    ...run('f4', { driver: 'file', filename: '$D/m.raw', size: 4096, preallocation: 'metadata' }),
    ...run('f5', { driver: 'file', filename: '$D/nodir/x.raw', size: 4096 }),
    ...run('f6', { driver: 'file', filename: '$D', size: 4096 }),
    ...run('f7', { driver: 'file', filename: '$D/h.raw', size: 4096, 'extent-size-hint': -1 }),
    ...run('f8', { driver: 'file', filename: '$D/n.raw', size: -1 }),
    ...run('f9', { driver: 'file', filename: '$D/e.raw', size: 0, 'extent-size-hint': 65536 }),
    // qcow2 options, on fresh files and on a file with old data
    { execute: 'blockdev-add', arguments: { driver: 'file', 'node-name': 'o1', filename: '$D/old.raw' } },
    ...run('q1', { driver: 'qcow2', file: 'o1', size: 20 * MiB, 'cluster-size': 4096, 'refcount-bits': 8, 'lazy-refcounts': true }),
    { execute: 'blockdev-del', arguments: { 'node-name': 'o1' } },
    ...run('q2', { driver: 'qcow2', file: { driver: 'file', filename: '$D/v2.qcow2' }, size: 10 * MiB, version: 'v2', 'backing-file': 'base.raw', 'backing-fmt': 'raw' }),
    ...run('q3', { driver: 'qcow2', file: { driver: 'file', filename: '$D/meta.qcow2' }, size: 5 * MiB + 512, preallocation: 'metadata', 'cluster-size': 65536 }),
    ...run('q4', { driver: 'qcow2', file: { driver: 'file', filename: '$D/missing.qcow2' }, size: MiB }),
    ...run('qk', {
      driver: 'qcow2',
      file: { driver: 'file', filename: '$D/defaults.qcow2', 'node-name': 'tmp0' },
      size: 3 * MiB,
      version: 'v3',
      'cluster-size': 65536,
      'refcount-bits': 16,
      'lazy-refcounts': false,
      preallocation: 'off',
      'compression-type': 'zlib',
      'extended-l2': false,
      'data-file-raw': false,
    }),
    { execute: 'query-named-block-nodes' },
    ...run('q5', { driver: 'qcow2', file: 'nothere', size: MiB }),
    { execute: 'blockdev-add', arguments: { driver: 'file', 'node-name': 'e1', filename: '$D/e.raw' } },
    ...run('q6', { driver: 'qcow2', file: 'e1', size: 1000 }),
    ...run('q7', { driver: 'qcow2', file: 'e1', size: MiB, 'cluster-size': 1000 }),
    ...run('q8', { driver: 'qcow2', file: 'e1', size: MiB, version: 'v2', 'lazy-refcounts': true }),
    ...run('q9', { driver: 'qcow2', file: 'e1', size: MiB, 'refcount-bits': 0 }),
    ...run('qa', { driver: 'qcow2', file: 'e1', size: MiB, version: 'v2', 'refcount-bits': 8 }),
    ...run('qb', { driver: 'qcow2', file: 'e1', size: MiB, 'backing-fmt': 'raw' }),
    ...run('qc', { driver: 'qcow2', file: 'e1', size: MiB, 'backing-file': 'b', preallocation: 'metadata' }),
    ...run('qd', { driver: 'qcow2', file: 'e1', size: MiB, 'extended-l2': true, 'cluster-size': 4096 }),
    ...run('qe', { driver: 'qcow2', file: 'e1', size: MiB, 'compression-type': 'zstd', version: 'v2' }),
    ...run('qf', { driver: 'qcow2', file: 'e1', size: MiB, 'data-file-raw': true }),
    ...run('qg', { driver: 'qcow2', file: 'e1', size: -512 }),
    ...run('qi', { driver: 'qcow2', file: 'e1', size: 2 ** 52 }),
    ...run('qj', { driver: 'qcow2', file: 'e1', size: MiB, 'backing-file': 'x'.repeat(1024) }),
    { execute: 'blockdev-del', arguments: { 'node-name': 'e1' } },
    { execute: 'blockdev-add', arguments: { driver: 'file', 'node-name': 'ro', filename: '$D/e.raw', 'read-only': true } },
    ...run('qh', { driver: 'qcow2', file: 'ro', size: MiB }),
    { execute: 'blockdev-del', arguments: { 'node-name': 'ro' } },
    // several concluded jobs: QEMU lists the newest first
    create('m1', { driver: 'file', filename: '$D/m1.raw', size: 512 }),
    create('m2', { driver: 'file', filename: '$D/m2.raw', size: 1024 }),
    create('m3', { driver: 'file', filename: '$D/nodir/m3.raw', size: 0 }),
    query,
    dismiss('m2'),
    query,
    dismiss('m1'),
    dismiss('m3'),
    // argument checking
    { execute: 'blockdev-create' },
    { execute: 'blockdev-create', arguments: { 'job-id': 'x' } },
    { execute: 'blockdev-create', arguments: { 'job-id': 1, options: {} } },
    { execute: 'blockdev-create', arguments: { 'job-id': 'x', options: [] } },
    { execute: 'blockdev-create', arguments: { 'job-id': 'x', options: {} } },
    create('x', { driver: 'foo' }),
    create('x', { driver: 7 }),
    create('x', { driver: 'raw' }),
    create('x', { driver: 'null-co', size: 1 }),
    create('x', { driver: 'raw', a: 1, b: 2, c: 3, size: 4, file: 5 }),
    create('x', { driver: 'file', size: 1 }),
    create('x', { driver: 'file', filename: 'f' }),
    create('x', { driver: 'file', filename: 1, size: 1 }),
    create('x', { driver: 'file', filename: 'f', size: '1' }),
    create('x', { driver: 'file', filename: 'f', size: 1.5 }),
    create('x', { driver: 'file', filename: 'f', size: 1, preallocation: 'most' }),
    create('x', { driver: 'file', filename: 'f', size: 1, nocow: 'yes' }),
    create('x', { driver: 'file', filename: 'f', size: 1, bogus: 1, other: 2, more: 3 }),
    create('x', { driver: 'file', filename: 'f', size: 1 }, { x: 1, y: 2 }),
    create('x', { driver: 'qcow2', size: 1 }),
    create('x', { driver: 'qcow2', file: 3, size: 1 }),
    create('x', { driver: 'qcow2', file: { filename: 'f' }, size: 1 }),
    create('x', { driver: 'qcow2', file: { driver: 'filex' }, size: 1 }),
    create('x', { driver: 'qcow2', file: 'f', size: 1, version: 'v4' }),
    create('x', { driver: 'qcow2', file: 'f', size: 1, 'backing-fmt': 'rawx' }),
    create('x', { driver: 'qcow2', file: 'f', size: 1, 'refcount-bits': '16' }),
    create('x', { driver: 'qcow2', file: 'f', size: 1, 'lazy-refcounts': 1, bogus: 2 }),
    // several strangers: QEMU names the first in GLib's hash order, through table resizes
    create('x', { driver: 'qcow2', file: 'f', size: 1, version: 'v3', 'cluster-size': 65536, 'lazy-refcounts': false, 'refcount-bits': 16, preallocation: 'off', 'compression-type': 'zlib', 'extended-l2': false, 'data-file-raw': false, zz: 1, yy: 2 }),
    create('x', { driver: 'file', filename: 'f', size: 1, a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7, h: 8, i: 9 }),
    create('x', { driver: 'file', filename: 'f', size: 1 }, { a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7 }),
    create('x', { driver: 'raw', 'node-name': 1, file: 2, 'read-only': 3, cache: 4, discard: 5, 'detect-zeroes': 6, 'auto-read-only': 7, 'force-share': 8 }),
    create('1x', { driver: 'file', filename: '$D/y.raw', size: 0 }),
    { execute: 'query-jobs' },
  ];
}

function substitute(v: unknown, dir: string): unknown {
  if (typeof v === 'string') return v.split('$D').join(dir);
  if (Array.isArray(v)) return v.map((x) => substitute(x, dir));
  if (typeof v === 'object' && v !== null) return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, substitute(x, dir)]));
  return v;
}

function mask(msgs: Msg[], dir: string): unknown {
  return JSON.parse(JSON.stringify(msgs).split(dir).join('$D'));
}

async function converse(path: string, dir: string): Promise<Msg[][]> {
  const t = await Transcript.open(path);
  try {
    const out: Msg[][] = [];
    for (const req of conversation()) out.push(mask(await t.step(substitute(req, dir) as Msg), dir) as Msg[]);
    return out;
  } finally {
    t.close();
  }
}

function prepare(dir: string): void {
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, 'big.raw'), Buffer.alloc(3 * MiB, 0x5a));
  // old data under the image: neither side empties a file before formatting it as qcow2
  const old = Buffer.alloc(2 * MiB);
  for (let i = 0; i < old.length; i++) old[i] = (i * 7 + (i >> 9)) & 0xff;
  writeFileSync(join(dir, 'old.raw'), old);
  writeFileSync(join(dir, 'base.raw'), '');
  writeFileSync(join(dir, 'v2.qcow2'), '');
  writeFileSync(join(dir, 'meta.qcow2'), '');
  writeFileSync(join(dir, 'defaults.qcow2'), '');
}

const FILES = ['a.qcow2', 'other', 'big.raw', 'odd.raw', 'fa.raw', 'm.raw', 'h.raw', 'e.raw', 'old.raw', 'v2.qcow2', 'meta.qcow2', 'defaults.qcow2'];

test('blockdev-create: the same conversation gives the same messages and files as QEMU 7.2', async (t) => {
  if (!requireTool(t, 'qemu-system-x86_64', ['--version']) || !requireTool(t, 'qemu-storage-daemon', ['--version']) || !requireTool(t, 'qemu-img', ['--version'])) {
    return;
  }
  const root = tempDir(t);
  const qdir = join(root, 'q');
  const sdir = join(root, 's');
  const ldir = join(root, 'l');
  for (const dir of [qdir, sdir, ldir]) prepare(dir);

  const conversations: Msg[][][] = [];
  for (const [kind, dir] of [['system', qdir], ['qsd', sdir]] as const) {
    const qemu = await startQemu(dir, kind);
    try {
      conversations.push(await converse(qemu.path, dir));
    } finally {
      qemu.proc.kill('SIGKILL');
    }
  }
  const [theirs, qsd] = conversations as [Msg[][], Msg[][]];
  assert.deepEqual(qsd, theirs, 'qemu-storage-daemon and qemu-system-x86_64 agree');

  const d = await startDaemon(t, ldir, []);
  const ours = await converse(d.qmpPath, ldir);

  const steps = conversation();
  if (process.env.CREATE_TEST_DUMP) for (let i = 0; i < steps.length; i++) console.log(JSON.stringify(steps[i]), '\n   ', JSON.stringify(ours[i]));
  for (let i = 0; i < steps.length; i++) {
    assert.deepEqual(ours[i], theirs[i], `step ${i}: ${JSON.stringify(steps[i])}`);
  }
  for (const f of FILES) {
    const a = join(qdir, f);
    const b = join(ldir, f);
    assert.equal(existsSync(b), existsSync(a), `${f} exists on both sides or on neither`);
    if (!existsSync(a)) continue;
    assert.ok(readFileSync(b).equals(readFileSync(a)), `${f}: lockstep's bytes equal QEMU's`);
  }
  for (const f of ['a.qcow2', 'old.raw', 'v2.qcow2', 'meta.qcow2']) {
    const r = spawnSync('qemu-img', ['check', join(ldir, f)], { encoding: 'utf8' });
    assert.equal(r.status, 0, `qemu-img check ${f}: ${r.stdout}${r.stderr}`);
  }
});

test('an image created over QMP serves I/O as a qcow2 node', async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, dir, []);
  const c = await d.client();
  const img = join(dir, 'disk.qcow2');
  const done = (id: string) => c.waitEvent('JOB_STATUS_CHANGE', (x) => x.id === id && x.status === 'concluded');

  assert.deepEqual(await c.execute('blockdev-create', { 'job-id': 'c1', options: { driver: 'file', filename: img, size: 0 } }), {});
  await done('c1');
  await c.execute('job-dismiss', { id: 'c1' });
  await c.execute('blockdev-add', { driver: 'file', 'node-name': 'f1', filename: img });
  await c.execute('blockdev-create', { 'job-id': 'c2', options: { driver: 'qcow2', file: 'f1', size: 16 * MiB } });
  await done('c2');
  assert.deepEqual(await c.execute('query-jobs'), [{ id: 'c2', type: 'create', status: 'concluded', 'current-progress': 1, 'total-progress': 1 }]);
  await c.execute('job-dismiss', { id: 'c2' });
  assert.deepEqual(await c.execute('query-jobs'), []);

  // drivers QEMU can create with and lockstep cannot: said plainly, nothing started
  await assert.rejects(c.execute('blockdev-create', { 'job-id': 'v', options: { driver: 'vdi', file: 'f1', size: MiB } }), {
    desc: "Block driver 'vdi' not found or not supported",
  });
  // options QEMU has and lockstep does not: the job fails before touching the node
  const before = readFileSync(img);
  await c.execute('blockdev-create', { 'job-id': 'p', options: { driver: 'qcow2', file: 'f1', size: MiB, preallocation: 'full' } });
  await done('p');
  assert.deepEqual(await c.execute('query-jobs'), [
    {
      id: 'p',
      type: 'create',
      status: 'concluded',
      'current-progress': 1,
      'total-progress': 1,
      error: "Preallocation mode 'full' of qcow2 images is not supported by lockstep (use off or metadata)",
    },
  ]);
  await c.execute('job-dismiss', { id: 'p' });
  assert.ok(readFileSync(img).equals(before), 'the image is untouched');
  await c.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'disk', file: 'f1' });
  const nodes = (await c.execute('query-named-block-nodes', { flat: true })) as Array<{ 'node-name': string; image: Msg }>;
  assert.equal(nodes.find((n) => n['node-name'] === 'disk')!.image['virtual-size'], 16 * MiB);
  const hmp = (line: string) => c.execute('human-monitor-command', { 'command-line': line }) as Promise<string>;
  await hmp('qemu-io disk "write -P 0xa5 1M 192k"');
  await hmp('qemu-io disk "write -P 0x3c 15M 1M"');
  assert.equal(await hmp('qemu-io disk "read -q -P 0xa5 1M 192k"'), '');
  assert.equal(await hmp('qemu-io disk "read -q -P 0x3c 15M 1M"'), '');
  assert.equal(await hmp('qemu-io disk "read -q -P 0 0 1M"'), '');
  assert.match(await hmp('qemu-io disk "read -q -P 0x11 1M 512"'), /Pattern verification failed/);
  await c.execute('blockdev-del', { 'node-name': 'disk' });
  await c.execute('blockdev-del', { 'node-name': 'f1' });

  // on a memory node (no host I/O at all) the reply still comes before the job goes on
  const tr = await Transcript.open(d.qmpPath);
  await tr.step({ execute: 'qmp_capabilities' });
  await tr.step({ execute: 'blockdev-add', arguments: { driver: 'memory', 'node-name': 'm', size: 0 } });
  const status = (s: string): Msg => ({ event: 'JOB_STATUS_CHANGE', data: { id: 'm1', status: s } });
  assert.deepEqual(await tr.step({ execute: 'blockdev-create', arguments: { 'job-id': 'm1', options: { driver: 'qcow2', file: 'm', size: MiB } } }), [
    status('created'),
    status('running'),
    { return: {} },
    status('waiting'),
    status('pending'),
    status('concluded'),
  ]);
  tr.close();
  c.close();
  assert.equal(await d.stop(), 0);

  if (!requireTool(t, 'qemu-img', ['--version']) || !requireTool(t, 'qemu-io', ['--version'])) return;
  const r = spawnSync('qemu-img', ['check', img], { encoding: 'utf8' });
  assert.equal(r.status, 0, r.stdout + r.stderr);
  const io = spawnSync('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0xa5 1M 192k', '-c', 'read -P 0x3c 15M 1M', img], { encoding: 'utf8' });
  assert.equal(io.status, 0, io.stderr);
  assert.doesNotMatch(io.stdout, /fail/i);
});
