// Split brain (issue 13 item 5): both disks changed since the generation they last shared.
// The pair must copy nothing and serve nothing, report what each side changed, and wait for
// `lockstep pair resolve --keep SIDE`, which saves the other side's whole disk first (a qcow2
// that qemu-img reads) and then makes both disks the kept one's, byte for byte.
//
// On one host the two histories are made as a partition leaves them: after the pair stopped
// in step, each disk is written by a daemon of its own through its dirty log, and its record
// starts a new generation from the shared one (what a side that goes on alone records).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { copyFileSync, mkdirSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { PairSupervisor, type PairOptions } from '../../src/pair/supervisor.js';
import { controlRequest, serveControl } from '../../src/pair/control.js';
import type { PairStatus } from '../../src/pair/status.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import { newId, parseMeta, startGeneration, type DiskMeta } from '../../src/pair/generations.js';
import { writeFileDurably } from '../../src/pair/meta-store.js';
import { checkUnfenced } from '../../src/pair/split-brain.js';
import { PairMetrics } from '../../src/pair/metrics.js';
import { tempDir } from '../helpers/graph.js';
import { runLockstep, startDaemon } from '../helpers/daemon.js';
import { LOCKSTEP_BIN, requireTool } from '../helpers/processes.js';
import { canMakeNetns, makeNetwork, type TestHost } from '../helpers/netns.js';

const MiB = 1024 * 1024;
const KiB = 1024;
const SIZE = 16 * MiB;
const G = 64 * KiB; // the dirty logs' granule

function pair(dir: string, extra: Partial<PairOptions> = {}): PairSupervisor {
  return new PairSupervisor({
    dataDir: dir,
    control: join(dir, 'pair.sock'),
    size: SIZE,
    checkpointIntervalMs: 0,
    heartbeatIntervalMs: 50,
    heartbeatTimeoutMs: 3000,
    failover: 'auto',
    nbdSocket: join(dir, 'disk.sock'),
    reprotect: false,
    log: () => {},
    ...extra,
  });
}

async function withClient<T>(sock: string, fn: (c: NbdClient) => Promise<T>): Promise<T> {
  const c = await NbdClient.connect({ address: { type: 'unix', path: sock }, exportName: 'disk' });
  try {
    return await fn(c);
  } finally {
    await c.disconnect();
  }
}

const firstDiff = (a: Buffer, b: Buffer) => a.findIndex((x, i) => x !== b[i]);
const hash = (f: string) => createHash('sha256').update(readFileSync(f)).digest('hex');

function qemuCompare(a: string, b: string): string {
  return execFileSync('qemu-img', ['compare', '-U', '-f', 'qcow2', '-F', 'qcow2', a, b], { encoding: 'utf8' });
}

/** The guest bytes of a qcow2 image, read by qemu-img (not by lockstep). */
function qemuRead(image: string, dir: string): Buffer {
  const raw = join(dir, `read-${Date.now()}-${Math.random().toString(16).slice(2)}.raw`);
  execFileSync('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', image, raw]);
  try {
    return readFileSync(raw);
  } finally {
    rmSync(raw, { force: true });
  }
}

interface Write {
  offset: number;
  length: number;
  byte: number;
}

/** A disk written alone, as one side of a partition: a daemon with the disk under its dirty
 *  log, then its record starts a new generation from the shared one. */
async function goOnAlone(t: { after(fn: () => unknown): void }, dir: string, name: 'primary' | 'secondary', writes: Write[]): Promise<void> {
  const sock = join(dir, `${name}-alone.sock`);
  const d = await startDaemon(t, tempDir(t), [
    '--blockdev', `driver=qcow2,node-name=d0,file.driver=file,file.filename=${join(dir, `${name}.qcow2`)}`,
    '--blockdev', `driver=dirty-log,node-name=log0,file=d0,filename=${join(dir, `${name}.qcow2.dirty`)}`,
    '--nbd-server', `addr.type=unix,addr.path=${sock}`,
    '--export', 'type=nbd,id=e0,node-name=log0,name=disk,writable=on',
  ]);
  await withClient(sock, async (c) => {
    for (const w of writes) await c.write(w.offset, Buffer.alloc(w.length, w.byte));
    await c.flush();
  });
  assert.equal(await d.stop(), 0);
  rmSync(sock, { force: true });
  const path = join(dir, `${name}.qcow2.meta.json`);
  const meta = parseMeta(JSON.parse(readFileSync(path, 'utf8')), path)!;
  writeFileDurably(path, JSON.stringify(startGeneration(meta, newId(), name), null, 1) + '\n');
}

const apply = (base: Buffer, writes: Write[]) => {
  const b = Buffer.from(base);
  for (const w of writes) b.fill(w.byte, w.offset, w.offset + w.length);
  return b;
};

// the common data, then what each side wrote alone (overlapping at 1 MiB, unaligned at 10 MiB)
const COMMON: Write[] = [
  { offset: 0, length: 2 * MiB, byte: 0x11 },
  { offset: 6 * MiB, length: MiB, byte: 0x12 },
];
const PRIMARY_ALONE: Write[] = [
  { offset: MiB, length: G, byte: 0x5a },
  { offset: 10 * MiB, length: 2 * G + 1000, byte: 0x5b },
];
const SECONDARY_ALONE: Write[] = [
  { offset: MiB + 32 * KiB, length: G, byte: 0xa5 },
  { offset: 12 * MiB + 512, length: 4096, byte: 0xa6 },
];
// granules each record holds: 1 MiB (16) and 10 MiB .. +2G+1000 (160..162); 16..17 and 192
const PRIMARY_CHANGED = 4 * G;
const SECONDARY_CHANGED = 3 * G;
const DIVERGED = [
  { offset: MiB, length: 2 * G },
  { offset: 10 * MiB, length: 3 * G },
  { offset: 12 * MiB, length: G },
];

/** A data directory in split brain, and the bytes each side holds. */
async function makeSplitBrain(t: { after(fn: () => unknown): void }): Promise<{ dir: string; primary: Buffer; secondary: Buffer }> {
  const dir = tempDir(t);
  const first = pair(dir);
  t.after(() => first.stop());
  await first.start();
  await withClient(join(dir, 'disk.sock'), async (c) => {
    for (const w of COMMON) await c.write(w.offset, Buffer.alloc(w.length, w.byte));
  });
  await first.checkpoint();
  await first.stop();
  // a second start copies what the records name and empties both: the sides in step
  const second = pair(dir);
  t.after(() => second.stop());
  await second.start();
  assert.equal(second.status().sync?.kind, 'incremental');
  await second.stop();
  await goOnAlone(t, dir, 'primary', PRIMARY_ALONE);
  await goOnAlone(t, dir, 'secondary', SECONDARY_ALONE);
  for (const f of readdirSync(dir)) if (f.endsWith('.sock')) rmSync(join(dir, f), { force: true });
  const common = apply(Buffer.alloc(SIZE), COMMON);
  return { dir, primary: apply(common, PRIMARY_ALONE), secondary: apply(common, SECONDARY_ALONE) };
}

for (const keep of ['primary', 'secondary'] as const) {
  const drop = keep === 'primary' ? 'secondary' : 'primary';
  test(`split brain: nothing copied or served, each side's changes counted; resolve --keep ${keep} saves the ${drop}'s whole disk, then both disks hold the ${keep}'s bytes`, { timeout: 90_000 }, async (t) => {
    const sb = await makeSplitBrain(t);
    const dir = sb.dir;
    const want = { primary: sb.primary, secondary: sb.secondary };
    // the disks as they were, to compare the saved image with
    const before = { primary: join(dir, 'before-primary.qcow2'), secondary: join(dir, 'before-secondary.qcow2') };
    for (const n of ['primary', 'secondary'] as const) copyFileSync(join(dir, `${n}.qcow2`), before[n]);
    for (const n of ['primary', 'secondary'] as const) assert.equal(firstDiff(qemuRead(before[n], dir), want[n]), -1, `the ${n} disk holds its own history`);
    const hashes = () => [hash(join(dir, 'primary.qcow2')), hash(join(dir, 'secondary.qcow2'))];
    const hashed = hashes();

    const sup = pair(dir);
    t.after(() => sup.stop());
    await sup.start();
    assert.equal(sup.stage, 'split-brain');
    const st = sup.status();
    assert.equal(st.role, 'none serving');
    assert.deepEqual(st.serving, []);
    assert.deepEqual(st['split-brain']?.['changed-bytes'], { primary: PRIMARY_CHANGED, secondary: SECONDARY_CHANGED });
    assert.equal(st['split-brain']?.['diverged-bytes'], 6 * G);
    assert.match(st['split-brain']!.commands[0]!, /^lockstep pair resolve --keep primary --control /);
    assert.equal(st.sides?.primary['changed-bytes'], PRIMARY_CHANGED);
    assert.equal(st.sides?.secondary['changed-bytes'], SECONDARY_CHANGED);
    assert.match(st['last-error'] ?? '', /split brain: both disks changed since generation \w+/);
    const scrape = sup.metrics.render(st);
    assert.match(scrape, new RegExp(`lockstep_pair_side_changed_bytes\\{side="primary"\\} ${PRIMARY_CHANGED}\\n`));
    assert.match(scrape, /lockstep_pair_stage\{stage="split-brain"\} 1/);
    // nothing replicates, nothing fails over, nothing is served
    await assert.rejects(sup.checkpoint(), /no checkpoint in stage split-brain/);
    await assert.rejects(sup.failover(), /no failover in stage split-brain/);
    await assert.rejects(withClient(join(dir, 'disk.sock'), async () => {}));
    assert.deepEqual(hashes(), hashed, 'neither disk file changed');

    const ctl = join(dir, 'pair.sock');
    const server = await serveControl(sup, ctl);
    t.after(() => server.close());
    const check = await runLockstep(['pair', 'status', '--check', '--control', ctl]);
    assert.equal(check.code, 8, check.stdout + check.stderr);
    assert.match(check.stdout, /^split-brain: none serving/);
    const bad = await runLockstep(['pair', 'resolve', '--keep', 'both', '--control', ctl]);
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /--keep primary\|secondary is required, got 'both'/);
    assert.deepEqual(hashes(), hashed, 'neither disk file changed');

    const r = await runLockstep(['pair', 'resolve', '--keep', keep, '--json', '--control', ctl]);
    assert.equal(r.code, 0, r.stderr);
    const res = JSON.parse(r.stdout) as { kept: string; saved: { side: string; image: string; description: string }; copied: { extents: unknown[]; bytes: number }; status: { stage: string } };
    assert.equal(res.kept, keep);
    assert.equal(res.saved.side, drop);
    assert.equal(res.status.stage, 'protected');
    assert.match(res.saved.image, new RegExp(`/split-brain-${drop}-\\d{8}T\\d{6}Z\\.qcow2$`));
    // exactly the union of the two records was copied from the kept side
    assert.deepEqual(res.copied.extents, DIVERGED);
    assert.equal(res.copied.bytes, 6 * G);

    // the saved image is the discarded disk, whole, as it was: qemu-img reads it alone
    const info = JSON.parse(execFileSync('qemu-img', ['info', '-U', '--output=json', res.saved.image], { encoding: 'utf8' })) as { format: string; 'backing-filename'?: string; 'virtual-size': number };
    assert.equal(info.format, 'qcow2');
    assert.equal(info['backing-filename'], undefined);
    assert.equal(info['virtual-size'], SIZE);
    assert.match(qemuCompare(res.saved.image, before[drop]), /Images are identical/);
    assert.equal(firstDiff(qemuRead(res.saved.image, dir), want[drop]), -1, `the saved image holds the ${drop}'s bytes`);
    const described = JSON.parse(readFileSync(res.saved.description, 'utf8')) as { side: string; 'diverged-extents': unknown; 'changed-bytes': unknown };
    assert.equal(described.side, drop);
    assert.deepEqual(described['diverged-extents'], DIVERGED);
    assert.deepEqual(described['changed-bytes'], { primary: PRIMARY_CHANGED, secondary: SECONDARY_CHANGED });

    // the pair serves the kept side's bytes; nothing is left to resolve
    assert.equal(firstDiff(await withClient(join(dir, 'disk.sock'), (c) => c.read(0, SIZE)), want[keep]), -1);
    const again = await runLockstep(['pair', 'resolve', '--keep', keep, '--control', ctl]);
    assert.equal(again.code, 2, again.stderr);
    assert.match(again.stderr, /nothing to resolve: the pair is protected, not in split brain/);
    const after = sup.status();
    assert.equal(after.disks?.primary?.generation, after.disks?.secondary?.generation);
    assert.equal(after.sides?.primary['changed-bytes'], 0);
    await sup.stop();
    assert.match(qemuCompare(join(dir, 'primary.qcow2'), join(dir, 'secondary.qcow2')), /Images are identical/);
    assert.equal(firstDiff(qemuRead(join(dir, 'primary.qcow2'), dir), want[keep]), -1);
  });
}

test('resolve is refused (exit 3) while the side to save has no daemon, and changes nothing', { timeout: 60_000 }, async (t) => {
  const { dir } = await makeSplitBrain(t);
  const hashed = [hash(join(dir, 'primary.qcow2')), hash(join(dir, 'secondary.qcow2'))];
  const sup = pair(dir);
  t.after(() => sup.stop());
  await sup.start();
  assert.equal(sup.stage, 'split-brain');
  const ctl = join(dir, 'pair.sock');
  const server = await serveControl(sup, ctl);
  t.after(() => server.close());
  const secondary = (sup as unknown as { secondary: { child: ChildProcess } }).secondary.child;
  const gone = new Promise((r) => secondary.once('exit', r));
  secondary.kill('SIGKILL');
  await gone;
  const r = await runLockstep(['pair', 'resolve', '--keep', 'primary', '--control', ctl]);
  assert.equal(r.code, 3, r.stdout + r.stderr);
  assert.match(r.stderr, /the secondary daemon is not running: start the pair again/);
  assert.equal(sup.stage, 'split-brain');
  await sup.stop();
  assert.deepEqual([hash(join(dir, 'primary.qcow2')), hash(join(dir, 'secondary.qcow2'))], hashed, 'neither disk file changed');
  assert.deepEqual(readdirSync(dir).filter((f) => f.startsWith('split-brain-')), [], 'nothing was saved');
});

test('resolve with no supervisor to ask exits 4 and says to start the pair', async (t) => {
  const dir = tempDir(t);
  const none = await runLockstep(['pair', 'resolve', '--keep', 'primary', '--control', join(dir, 'nobody.sock')]);
  assert.equal(none.code, 4, none.stderr);
  assert.match(none.stderr, /no supervisor runs: start the pair/);
});

const meta = (over: Partial<DiskMeta>): DiskMeta => ({
  format: 'lockstep-pair-meta',
  version: 1,
  disk: 'x.qcow2',
  size: SIZE,
  current: 'g0',
  bitmap: null,
  history: [],
  consistent: true,
  role: 'primary',
  checkpoint: 0,
  updated: '',
  ...over,
});

test('an unfenced failover: the old primary\'s changes make it split brain, none keep it incremental', () => {
  const p = meta({ current: 'g0' });
  const s = meta({ current: 'g1', bitmap: 'g0', history: ['g0'], role: 'primary', unfencedPeer: 'g0' });
  const inc = { kind: 'incremental', source: 'secondary', reason: 'the secondary disk went on' } as const;
  const rec = (pb: number, sbytes: number) => ({ primary: { extents: [], bytes: pb }, secondary: { extents: [], bytes: sbytes } });
  const d = checkUnfenced(inc, p, s, rec(65536, 131072));
  assert.equal(d.kind, 'split-brain');
  assert.match(d.reason, /without fencing the primary .* changed 65536 bytes since/);
  assert.deepEqual(checkUnfenced(inc, p, s, rec(0, 131072)), inc);
  // a fenced failover (no mark), or a mark for another generation: as before
  assert.deepEqual(checkUnfenced(inc, p, { ...s, unfencedPeer: undefined }, rec(65536, 0)), inc);
  assert.deepEqual(checkUnfenced(inc, { ...p, current: 'g9' }, s, rec(65536, 0)), inc);
});

test('the per-side gauges and the resync rate are in the scrape', () => {
  const m = new PairMetrics();
  const text = m.render({ stage: 'split-brain', sides: { primary: { 'changed-bytes': 262144 }, secondary: { 'changed-bytes': 196608 } } });
  assert.match(text, /lockstep_pair_side_changed_bytes\{side="primary"\} 262144\n/);
  assert.match(text, /lockstep_pair_side_changed_bytes\{side="secondary"\} 196608\n/);
  assert.match(text, /lockstep_pair_resync_bytes_per_second 0\n/);
  assert.match(text, /lockstep_pair_connection_state\{state="StandAlone"\} 1/);
  const r = m.render({ stage: 'resyncing', resync: { done: 100, total: 400, 'bytes-per-second': 52428800 }, sides: { primary: { 'changed-bytes': 300 }, secondary: { 'changed-bytes': null } } });
  assert.match(r, /lockstep_pair_resync_bytes_per_second 52428800\n/);
  assert.doesNotMatch(r, /lockstep_pair_side_changed_bytes\{side="secondary"\}/);
});

test('each side in the status: generation, consistency, role, changed bytes and the resync into it', async () => {
  const { buildSides } = await import('../../src/pair/status.js');
  const m = { primary: meta({ current: 'g2', bitmap: 'g1' }), secondary: meta({ current: 'g1', consistent: false, role: 'secondary' }) };
  const resync = { done: 1 * MiB, total: 4 * MiB, 'bytes-per-second': 2 * MiB, 'eta-seconds': 1.5 };
  assert.deepEqual(buildSides({ stage: 'resyncing', meta: m, resync }), {
    primary: { generation: 'g2', consistent: true, role: 'Primary', 'changed-bytes': 3 * MiB, resync: null },
    secondary: { generation: 'g1', consistent: false, role: 'Secondary', 'changed-bytes': null, resync },
  });
  const sb = buildSides({ stage: 'split-brain', meta: m, splitChanged: { primary: 65536, secondary: 131072 } });
  assert.deepEqual([sb.primary.role, sb.primary['changed-bytes'], sb.secondary.role, sb.secondary['changed-bytes']], ['Secondary', 65536, 'Secondary', 131072]);
  const dg = buildSides({ stage: 'degraded', meta: { primary: m.primary, secondary: null }, degradedChanged: 4096 });
  assert.deepEqual([dg.primary['changed-bytes'], dg.secondary.role, dg.secondary.generation, dg.secondary.consistent], [4096, 'Unknown', null, null]);
  // a resolve's copy onto the primary: the secondary's bytes it still lacks, the primary's progress
  const back = buildSides({ stage: 'syncing', meta: m, resync, resyncTarget: 'primary' });
  assert.deepEqual([back.primary.resync, back.secondary.resync, back.secondary['changed-bytes'], back.primary['changed-bytes']], [resync, null, 3 * MiB, null]);
  const rate = new PairMetrics().render({ stage: 'syncing', sides: { primary: { 'changed-bytes': null, resync }, secondary: { 'changed-bytes': 3 * MiB, resync: null } } });
  assert.match(rate, new RegExp(`lockstep_pair_resync_bytes_per_second ${2 * MiB}\n`));
  const pr = buildSides({ stage: 'protected', meta: m });
  assert.deepEqual([pr.primary['changed-bytes'], pr.secondary['changed-bytes']], [0, 0]);
});

// ---- across two hosts: a cut link with --lease off ------------------------------------

const netnsSkip = requireTool('ip') && requireTool('qemu-io') && canMakeNetns() ? false : 'needs root, iproute2 and qemu-io (network namespaces)';

interface Proc {
  child: ChildProcess;
  output(): string;
  exited: Promise<number | null>;
}

/** Runs `lockstep ARGS` inside namespace `ns`. */
function runIn(ns: string, args: string[]): Proc {
  const child = spawn('ip', ['netns', 'exec', ns, process.execPath, LOCKSTEP_BIN, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (out += d.toString()));
  const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
  return { child, output: () => out, exited };
}

async function until<T>(what: string, fn: () => Promise<T | undefined> | T | undefined, timeoutMs = 30_000): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function stageOf(control: string, sup: Proc, stage: string): Promise<PairStatus> {
  return until(
    `stage ${stage}`,
    async () => {
      if (sup.child.exitCode !== null) throw new Error(`the supervisor exited: ${sup.output()}`);
      const r = await controlRequest(control, 'status', 5000).catch(() => undefined);
      const st = r?.ok ? (r.result as PairStatus) : undefined;
      return st?.stage === stage ? st : undefined;
    },
    60_000,
  );
}

test('split brain across two hosts: the link cut with --lease off, the old primary and the survivor both write; the restarted pair copies nothing; resolve --keep primary saves the survivor\'s disk on its host and keeps the old primary\'s bytes', { skip: netnsSkip, timeout: 90_000 }, async (t) => {
  const net = makeNetwork(13);
  const procs: Proc[] = [];
  t.after(async () => {
    for (const p of procs) if (p.child.exitCode === null && p.child.signalCode === null) p.child.kill('SIGKILL');
    await Promise.all(procs.map((p) => p.exited));
    net.remove();
  });
  const root = tempDir(t, 'lockstep-sb-');
  const dirA = join(root, 'host-a');
  const dirB = join(root, 'host-b');
  const supDir = join(root, 'supervisor');
  for (const d of [dirA, dirB, supDir]) mkdirSync(d);
  const startHost = async (h: TestHost): Promise<Proc> => {
    const p = runIn(h.ns, ['pair', 'host', '--listen', `${h.ip}:4444`, '--insecure']);
    procs.push(p);
    await until('a pair host to listen', () => {
      if (p.child.exitCode !== null) throw new Error(`pair host exited: ${p.output()}`);
      return p.output().includes('QMP monitor listening') ? true : undefined;
    });
    return p;
  };
  const stop = async (p: Proc) => {
    p.child.kill('SIGTERM');
    await p.exited;
  };
  let hosts = [await startHost(net.a), await startHost(net.b)];
  // the common data, on the primary's disk before the pair exists, declared current
  const pdisk = join(dirA, 'primary.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', pdisk, String(SIZE)]);
  execFileSync('qemu-io', ['-f', 'qcow2', ...COMMON.flatMap((w) => ['-c', `write -q -P ${w.byte} ${w.offset} ${w.length}`]), pdisk]);
  const control = join(supDir, 'pair.sock');
  const supArgs = [
    'pair', 'run', '--primary-qmp', `${net.a.ip}:4444`, '--secondary-qmp', `${net.b.ip}:4444`,
    '--primary-dir', dirA, '--secondary-dir', dirB, '--data-dir', supDir, '--size', String(SIZE),
    '--nbd-port', '0', '--checkpoint-interval', '0', '--heartbeat-interval', '50ms', '--heartbeat-timeout', '400ms',
    '--lease', 'off', '--flush-commit', 'off', '--insecure',
    // the split brain is found by the next start here (the running pair's own finding is
    // test/pair/netns.test.ts's): no re-protection attempt once the link heals
    '--reprotect', 'off',
  ];
  const first = runIn(net.b.ns, [...supArgs, '--force-current', 'primary']);
  procs.push(first);
  await stageOf(control, first, 'protected');
  net.cut();
  await stageOf(control, first, 'failed-over');
  assert.match(first.output(), /failed over without fencing the old primary/);
  // nothing fences the old primary: its client's writes are acknowledged, as the survivor's are
  // (no flush there: the daemon's clean quit below writes its image out)
  await withClient(join(dirA, 'disk.sock'), async (c) => {
    for (const w of PRIMARY_ALONE) await c.write(w.offset, Buffer.alloc(w.length, w.byte));
  });
  await withClient(join(dirB, 'disk.sock'), async (c) => {
    for (const w of SECONDARY_ALONE) await c.write(w.offset, Buffer.alloc(w.length, w.byte));
    await c.flush();
  });
  net.heal();
  await stop(first);
  for (const h of hosts) await stop(h);
  const common = apply(Buffer.alloc(SIZE), COMMON);
  const want = { primary: apply(common, PRIMARY_ALONE), secondary: apply(common, SECONDARY_ALONE) };
  const sdisk = join(dirB, 'secondary.qcow2');
  const beforeSecondary = join(root, 'before-secondary.qcow2');
  copyFileSync(sdisk, beforeSecondary);
  assert.equal(firstDiff(qemuRead(pdisk, root), want.primary), -1, 'the old primary kept its writes');
  assert.equal(firstDiff(qemuRead(sdisk, root), want.secondary), -1, 'the survivor kept its writes');
  const hashed = [hash(pdisk), hash(sdisk)];

  // the pair started again on the same disks: split brain, nothing copied or served
  hosts = [await startHost(net.a), await startHost(net.b)];
  const again = runIn(net.b.ns, supArgs);
  procs.push(again);
  const st = await stageOf(control, again, 'split-brain');
  assert.deepEqual(st['split-brain']?.['changed-bytes'], { primary: PRIMARY_CHANGED, secondary: SECONDARY_CHANGED });
  assert.match(st['split-brain']!.reason, /the secondary disk took over from generation \w+ without fencing the primary/);
  assert.deepEqual(st.serving, []);
  assert.match(again.output(), /lockstep pair resolve --keep secondary --control /);
  assert.deepEqual([hash(pdisk), hash(sdisk)], hashed, 'neither disk file changed');

  const r = await runLockstep(['pair', 'resolve', '--keep', 'primary', '--json', '--control', control]);
  assert.equal(r.code, 0, r.stderr + again.output());
  const res = JSON.parse(r.stdout) as { saved: { side: string; image: string; description: string }; copied: { extents: unknown[] } };
  assert.equal(res.saved.side, 'secondary');
  assert.equal(join(res.saved.image, '..'), dirB, 'saved on the survivor\'s host, beside its disk');
  assert.deepEqual(res.copied.extents, DIVERGED);
  assert.match(qemuCompare(res.saved.image, beforeSecondary), /Images are identical/);
  assert.deepEqual((JSON.parse(readFileSync(res.saved.description, 'utf8')) as { 'diverged-extents': unknown })['diverged-extents'], DIVERGED);
  assert.equal(firstDiff(await withClient(join(dirA, 'disk.sock'), (c) => c.read(0, SIZE)), want.primary), -1);
  await stop(again);
  for (const h of hosts) await stop(h);
  assert.match(qemuCompare(pdisk, sdisk), /Images are identical/);
  assert.equal(firstDiff(qemuRead(sdisk, root), want.primary), -1);
});
