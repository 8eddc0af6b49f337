// The pair across two hosts: each side a `lockstep pair host` daemon in its own network
// namespace (made by the test, joined by veth), the supervisor on the secondary's host, TLS
// with certificates made here by openssl, or plain TCP with --insecure. After each failure
// (the primary killed, the secondary killed, the link cut) the data rules are checked byte
// for byte through the NBD exports, which the test reaches over their Unix sockets. A guest
// (ext4 and sqlite through nbdfuse and a loop device) rides out a cut link.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { copyFileSync, mkdirSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { NbdClient } from '../../src/nbd/client/client.js';
import { controlRequest } from '../../src/pair/control.js';
import type { PairStatus } from '../../src/pair/supervisor.js';
import { compareGenerations, parseMeta, type DiskMeta } from '../../src/pair/generations.js';
import { tempDir } from '../helpers/graph.js';
import { LOCKSTEP_BIN, requireTool } from '../helpers/processes.js';
import { canMakeNetns, makeNetwork, type TestNetwork } from '../helpers/netns.js';
import { GuestDisk, Workload, canMakeGuest, checkRecovered } from '../helpers/guest.js';
import { makeCerts } from '../nbd/tls-certs.js';
import { runLockstep, startDaemon } from '../helpers/daemon.js';
import { unionExtents, type ByteRange } from '../../src/pair/sync.js';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;
const QMP_PORT = 4444;
const HEARTBEAT = ['--heartbeat-interval', '50ms', '--heartbeat-timeout', '400ms'];

const usable = requireTool('ip') && requireTool('openssl') && canMakeNetns();
const skip = usable ? false : 'needs root, iproute2 and openssl (network namespaces)';
const guestSkip = canMakeGuest() ? false : 'needs /dev/fuse, loop devices, nbdfuse, e2fsprogs and sqlite3';

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

interface Pair {
  net: TestNetwork;
  root: string;
  dirA: string;
  dirB: string;
  control: string;
  hostA: Proc;
  hostB: Proc;
  sup: Proc | null;
  supArgs: string[];
  certs?: ReturnType<typeof makeCerts>;
}

/** Two hosts with a daemon each, not yet paired. */
async function twoHosts(t: { after(fn: () => unknown): void }, id: number, security: 'tls' | 'insecure'): Promise<Pair> {
  const net = makeNetwork(id);
  const procs: Proc[] = [];
  t.after(async () => {
    for (const p of procs) p.child.kill('SIGKILL');
    await Promise.all(procs.map((p) => p.exited));
    net.remove();
  });
  const root = tempDir(t, 'lockstep-netns-');
  const dirA = join(root, 'host-a');
  const dirB = join(root, 'host-b');
  const supDir = join(root, 'supervisor');
  for (const d of [dirA, dirB, supDir]) mkdirSync(d);
  const certs = security === 'tls' ? makeCerts(root, { ips: [net.a.ip, net.b.ip] }) : undefined;
  const sec = certs ? ['--tls-dir', certs.bothDir] : ['--insecure'];
  const hostA = runIn(net.a.ns, ['pair', 'host', '--listen', `${net.a.ip}:${QMP_PORT}`, ...sec]);
  const hostB = runIn(net.b.ns, ['pair', 'host', '--listen', `${net.b.ip}:${QMP_PORT}`, ...sec]);
  procs.push(hostA, hostB);
  for (const h of [hostA, hostB]) {
    await until('a pair host to listen', () => {
      if (h.child.exitCode !== null) throw new Error(`pair host exited: ${h.output()}`);
      return h.output().includes('QMP monitor listening') ? true : undefined;
    });
  }
  const supArgs = [
    'pair', 'run',
    '--primary-qmp', `${net.a.ip}:${QMP_PORT}`,
    '--secondary-qmp', `${net.b.ip}:${QMP_PORT}`,
    '--primary-dir', dirA,
    '--secondary-dir', dirB,
    '--data-dir', supDir,
    '--size', String(SIZE),
    // extents of 256 KiB: the pair's 4 MiB would make a crashed side's record most of this
    // small disk, and the resync's bounds checked below vacuous
    '--dirty-extent', '256K',
    '--nbd-port', '0',
    '--checkpoint-interval', '0',
    ...HEARTBEAT,
  ];
  const pair: Pair = { net, root, dirA, dirB, control: join(supDir, 'pair.sock'), hostA, hostB, sup: null, supArgs, ...(certs ? { certs } : {}) };
  t.after(() => pair.sup?.child.kill('SIGKILL'));
  return pair;
}

/** Starts the supervisor on the secondary's host and waits until the pair is protected. */
async function supervise(p: Pair, security: string[]): Promise<void> {
  const sup = runIn(p.net.b.ns, [...p.supArgs, ...security]);
  p.sup = sup;
  await until(
    'the pair to be protected',
    async () => {
      if (sup.child.exitCode !== null) throw new Error(`the supervisor exited: ${sup.output()}`);
      const st = await status(p).catch(() => undefined);
      return st?.stage === 'protected' ? st : undefined;
    },
    60_000,
  );
}

async function status(p: Pair): Promise<PairStatus> {
  const r = await controlRequest(p.control, 'status', 5000);
  if (!r.ok) throw new Error(r.error);
  return r.result as PairStatus;
}

async function checkpoint(p: Pair): Promise<void> {
  const r = await controlRequest(p.control, 'checkpoint', 10_000);
  assert.equal(r.ok, true, r.error);
}

const waitStage = (p: Pair, stage: string) =>
  until(`stage ${stage}`, async () => {
    const st = await status(p).catch(() => undefined);
    return st?.stage === stage ? st : undefined;
  });

async function readDisk(sock: string): Promise<Buffer> {
  const c = await NbdClient.connect({ address: { type: 'unix', path: sock }, exportName: 'disk' });
  try {
    return await c.read(0, SIZE);
  } finally {
    await c.disconnect();
  }
}

/** The user's NBD connection to the primary, with a byte model of what it wrote. */
async function writer(sock: string) {
  const c = await NbdClient.connect({ address: { type: 'unix', path: sock }, exportName: 'disk' });
  const model = Buffer.alloc(SIZE);
  return {
    client: c,
    model,
    async write(off: number, len: number, byte: number): Promise<void> {
      const b = Buffer.alloc(len, byte);
      await c.write(off, b);
      b.copy(model, off);
    },
  };
}

const firstDiff = (a: Buffer, b: Buffer) => a.findIndex((x, i) => x !== b[i]);

test('TLS between two hosts: peers with the wrong certificates are refused; the primary killed, the secondary serves the last checkpoint', { skip, timeout: 120_000 }, async (t) => {
  const p = await twoHosts(t, 1, 'tls');
  const certs = p.certs!;
  // the daemons verify the supervisor: a client certificate from another CA is refused
  const rogue = runIn(p.net.b.ns, [...p.supArgs, '--tls-dir', certs.otherClientDir]);
  assert.equal(await rogue.exited, 1);
  assert.match(rogue.output(), /cannot reach the secondary daemon's QMP/);
  // the supervisor verifies the daemons: it trusts only its CA
  const wrongCa = join(p.root, 'wrong-ca');
  mkdirSync(wrongCa);
  copyFileSync(join(certs.otherCaDir, 'ca-cert.pem'), join(wrongCa, 'ca-cert.pem'));
  for (const f of ['client-cert.pem', 'client-key.pem']) copyFileSync(join(certs.clientDir, f), join(wrongCa, f));
  const mistrust = runIn(p.net.b.ns, [...p.supArgs, '--tls-dir', wrongCa]);
  assert.equal(await mistrust.exited, 1);
  assert.match(mistrust.output(), /cannot reach the secondary daemon's QMP.*(certificate|self.signed)/i);

  await supervise(p, ['--tls-dir', certs.clientDir]);
  const w = await writer(join(p.dirA, 'disk.sock'));
  const load = [];
  for (let i = 0; i < 32; i++) load.push(w.write(i * 300 * 1024 + 512, 7000, 0x10 + i));
  await Promise.all(load);
  await checkpoint(p);
  // the disk at the checkpoint as the primary serves it (disjoint writes: the model is exact)
  const atCheckpoint = await w.client.read(0, SIZE);
  assert.equal(firstDiff(atCheckpoint, w.model), -1);
  for (let i = 0; i < 16; i++) await w.write(i * 640 * 1024, 64 * 1024, 0xa0 + i);
  w.client.destroy();
  p.hostA.child.kill('SIGKILL');
  const st = await waitStage(p, 'failed-over');
  assert.deepEqual(st.serving, [`nbd+unix:///disk?socket=${join(p.dirB, 'disk.sock')}`]);
  const got = await readDisk(join(p.dirB, 'disk.sock'));
  assert.equal(firstDiff(got, atCheckpoint), -1, 'the recovered disk differs from the last checkpoint');
  assert.equal(st.checkpoints, 1);
});

test('plain TCP between hosts needs --insecure; the secondary killed, the primary keeps serving and lists what changed', { skip, timeout: 120_000 }, async (t) => {
  const p = await twoHosts(t, 2, 'insecure');
  const refused = runIn(p.net.b.ns, p.supArgs);
  assert.equal(await refused.exited, 1);
  assert.match(refused.output(), /is not a loopback address: give TLS credentials \(--tls-dir\) or allow plain TCP with --insecure/);

  await supervise(p, ['--insecure']);
  // a second supervisor for the same daemons is refused before it touches anything
  const second = runIn(p.net.b.ns, [...p.supArgs, '--insecure', '--control', join(p.root, 'second.sock')]);
  assert.equal(await second.exited, 1);
  assert.match(second.output(), /the secondary daemon at [\d.]+:4444 already has block nodes \(.*parent0.*\): lockstep pair sets up freshly started daemons/);
  assert.equal((await status(p)).stage, 'protected');
  const w = await writer(join(p.dirA, 'disk.sock'));
  await w.write(0, 4096, 0x01);
  await checkpoint(p);
  await w.write(3 * 65536, 4096, 0x02); // after the checkpoint: the secondary may lose it
  p.hostB.child.kill('SIGKILL');
  await waitStage(p, 'degraded');
  await w.write(10 * 65536 + 1, 2 * 65536, 0x03); // granules 10, 11, 12
  assert.equal(firstDiff(await w.client.read(0, SIZE), w.model), -1);
  await w.client.disconnect();
  assert.equal(firstDiff(await readDisk(join(p.dirA, 'disk.sock')), w.model), -1);
  const st = await until('the changed regions', async () => {
    const s = await status(p);
    return s['changed-bytes'] === 4 * 65536 ? s : undefined;
  });
  assert.match(st['last-error'] ?? '', /secondary died/);
  const changed = JSON.parse(readFileSync(st['changed-regions-file']!, 'utf8')) as { nodes: Array<{ regions: unknown }> };
  assert.deepEqual(changed.nodes[0]!.regions, [
    { offset: 3 * 65536, length: 65536 },
    { offset: 10 * 65536, length: 3 * 65536 },
  ]);
});

test('TLS, the link cut: the secondary fails over to the last checkpoint; the old primary acknowledges no write after that (lease), the healed link brings nothing through', { skip, timeout: 120_000 }, async (t) => {
  const p = await twoHosts(t, 3, 'tls');
  // the old primary stays as the heal left it (no automatic re-protection): its records are read below
  await supervise(p, ['--tls-dir', p.certs!.clientDir, '--reprotect', 'off']);
  const w = await writer(join(p.dirA, 'disk.sock'));
  for (let i = 0; i < 8; i++) await w.write(i * MiB, 8192, 0x20 + i);
  await checkpoint(p);
  const atCheckpoint = await w.client.read(0, SIZE);
  assert.equal(firstDiff(atCheckpoint, w.model), -1);
  await w.write(100 * 1024, 4096, 0x55);
  // a client writing a counter to the old primary, one write after another, noting when
  // each was acknowledged (this host's clock, as the supervisor's log)
  const acks: Array<{ n: number; at: number }> = [];
  let stop = false;
  let pending = 0;
  const counter = (async () => {
    for (let n = 1; !stop; n++) {
      const b = Buffer.alloc(4096);
      b.writeUInt32LE(n, 0);
      pending = n;
      try {
        await w.client.write(5 * MiB, b);
      } catch {
        return; // fenced: failed, never acknowledged
      }
      acks.push({ n, at: Date.now() });
    }
  })();
  while (acks.length < 5) await new Promise((r) => setTimeout(r, 10));
  p.net.cut();
  await waitStage(p, 'failed-over');
  assert.equal(firstDiff(await readDisk(join(p.dirB, 'disk.sock')), atCheckpoint), -1);
  // the supervisor serves the recovered disk only after it logged that the lease ran out
  const line = p.sup!.output().split('\n').find((l) => l.includes("the old primary's lease has run out"));
  assert.ok(line, `no lease line in the supervisor's log:\n${p.sup!.output()}`);
  const leaseOut = Date.parse((JSON.parse(line) as { time: string }).time);
  const last = acks[acks.length - 1]!;
  assert.ok(last.at <= leaseOut, `write ${last.n} was acknowledged ${last.at - leaseOut} ms after the old primary's lease ran out`);
  // the old primary holds the next write: not acknowledged, even once the link heals (the
  // supervisor renews the lease of no primary it lost)
  const heldWrite = pending;
  p.net.heal();
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(acks[acks.length - 1]!.n, last.n, `write ${heldWrite} was acknowledged after failover`);
  assert.equal(firstDiff(await readDisk(join(p.dirB, 'disk.sock')), atCheckpoint), -1);
  // reads are not fenced: the old primary still shows its own disk
  assert.ok((await w.client.read(0, MiB)).equals(w.model.subarray(0, MiB)));
  stop = true;
  w.client.destroy();
  await counter;
  // after the heal the two generation records tell the survivor is newer and the old primary
  // went on from nothing but its own last generation: no split brain, an incremental resync
  // from the survivor (the lease fenced the old primary, so the failover left no unfenced mark)
  const record = (dir: string, name: string): DiskMeta => {
    const path = join(dir, `${name}.qcow2.meta.json`);
    return parseMeta(JSON.parse(readFileSync(path, 'utf8')), path)!;
  };
  const old = record(p.dirA, 'primary');
  const survivor = record(p.dirB, 'secondary');
  assert.equal(survivor.unfencedPeer, undefined, 'the failover fenced the old primary');
  const decision = compareGenerations(old, survivor);
  assert.deepEqual({ kind: decision.kind, source: 'source' in decision ? decision.source : null }, { kind: 'incremental', source: 'secondary' }, decision.reason);
});

test("TLS, after a failover the old primary's host comes back: `pair reprotect` makes the survivor the primary, resyncs the old disk over the link, and a failover back serves the new primary's checkpoint", { skip, timeout: 150_000 }, async (t) => {
  const p = await twoHosts(t, 6, 'tls');
  const certs = p.certs!;
  // the operator's command, not the automatic re-protection (the test below)
  await supervise(p, ['--tls-dir', certs.clientDir, '--reprotect', 'off']);
  const w = await writer(join(p.dirA, 'disk.sock'));
  await w.write(0, MiB, 0x11);
  await checkpoint(p);
  await w.write(MiB / 2, 65536, 0x22); // after the checkpoint: the failover discards it
  w.client.destroy();
  p.hostA.child.kill('SIGKILL');
  await p.hostA.exited;
  await waitStage(p, 'failed-over');

  // the survivor's client: one connection until the survivor dies
  const s = await writer(join(p.dirB, 'disk.sock'));
  s.model.fill(0x11, 0, MiB);
  await s.write(4 * MiB, MiB, 0x33);
  // the old primary's host is back: a fresh `pair host` on the same address
  const hostA = runIn(p.net.a.ns, ['pair', 'host', '--listen', `${p.net.a.ip}:${QMP_PORT}`, '--tls-dir', certs.bothDir]);
  t.after(async () => {
    hostA.child.kill('SIGKILL');
    await hostA.exited;
  });
  await until('the old primary\'s pair host to listen', () => {
    if (hostA.child.exitCode !== null) throw new Error(`pair host exited: ${hostA.output()}`);
    return hostA.output().includes('QMP monitor listening') ? true : undefined;
  });
  const r = await controlRequest(p.control, 'reprotect', 120_000);
  assert.equal(r.ok, true, r.error);
  const st = await waitStage(p, 'protected');
  assert.equal(st['primary-side'], 'secondary');
  assert.equal(st.sides?.secondary.role, 'Primary');
  assert.equal(st.disks?.primary?.generation, st.disks?.secondary?.generation);

  // replicated over the link in the new direction, through the same connection
  await s.write(6 * MiB, MiB, 0x44);
  await checkpoint(p);
  const atCheckpoint = Buffer.from(s.model);
  assert.equal(firstDiff(await s.client.read(0, SIZE), atCheckpoint), -1);
  await s.write(8 * MiB, 65536, 0x55); // after the checkpoint: lost with the new primary
  s.client.destroy();
  p.hostB.child.kill('SIGKILL');
  await p.hostB.exited;
  const back = await waitStage(p, 'failed-over');
  assert.deepEqual(back.serving, [`nbd+unix:///disk?socket=${join(p.dirA, 'disk.sock')}`]);
  const got = await readDisk(join(p.dirA, 'disk.sock'));
  assert.equal(firstDiff(got, atCheckpoint), -1, "the old primary's disk, recovered, is the new primary's disk at its checkpoint");
});

test("the link cut under a guest (issue 14): ext4 + sqlite on the primary's served disk, the guest in the primary's namespace; the secondary fails over, e2fsck is clean and every file and transaction acknowledged (output commit) is there; nothing was acknowledged after the old primary's lease ran out", { skip: skip || guestSkip, timeout: 180_000 }, async (t) => {
  const p = await twoHosts(t, 4, 'insecure');
  // no checkpoints but those output commit starts: with --flush-commit off this test fails
  // (every file is lost at failover)
  await supervise(p, ['--insecure']);
  let guest: GuestDisk | null = null;
  t.after(() => guest?.detach(true));
  // the guest's host is the primary's: its NBD client runs in that namespace
  guest = await GuestDisk.attach(join(p.root, 'guest'), `nbd+unix:///disk?socket=${join(p.dirA, 'disk.sock')}`, { netns: p.net.a.ns });
  await guest.mkfs();
  const work = new Workload(await guest.mount());
  work.start();
  // with output commit each of these was covered by a checkpoint before it was acknowledged
  await until('files and transactions acknowledged', () => {
    if (work.errors) throw new Error(`the guest failed before the cut: ${work.firstError}`);
    return work.files.size >= 3 && work.commits.length >= 2 ? true : undefined;
  });
  p.net.cut();
  await waitStage(p, 'failed-over');
  const line = p.sup!.output().split('\n').find((l) => l.includes("the old primary's lease has run out"));
  assert.ok(line, `no lease line in the supervisor's log:\n${p.sup!.output()}`);
  const leaseOut = Date.parse((JSON.parse(line) as { time: string }).time);
  // the guest goes on trying against the old primary a while longer: nothing may be acknowledged
  await new Promise((r) => setTimeout(r, 500));
  const last = work.lastAck();
  // the guest died with its host's link: abort its FUSE connection so that nothing hangs
  await guest.detach(true);
  await work.stop();
  assert.ok(last, 'nothing was acknowledged');
  assert.ok(last.wall <= leaseOut, `${last.what} was acknowledged ${last.wall - leaseOut} ms after the old primary's lease ran out`);
  const acked = work.durableBefore(Infinity);
  await checkRecovered(join(p.root, 'after'), `nbd+unix:///disk?socket=${join(p.dirB, 'disk.sock')}`, acked);
  t.diagnostic(`${acked.files.length} files and ${acked.rows.length} transactions acknowledged, all on the recovered disk; the last acknowledgement ${leaseOut - last.wall} ms before the lease ran out`);
});

const G = 65536;
/** The dirty-log granules a write touches. */
const granules = (offset: number, length: number): ByteRange => {
  const start = Math.floor(offset / G) * G;
  return { offset: start, length: Math.ceil((offset + length) / G) * G - start };
};
/** Every byte of `a` lies in `b`. */
const within = (a: readonly ByteRange[], b: readonly ByteRange[]): boolean => {
  const bb = unionExtents(b);
  return a.every((r) => bb.some((x) => x.offset <= r.offset && r.offset + r.length <= x.offset + x.length));
};
const bytesOf = (e: readonly ByteRange[]) => e.reduce((a, r) => a + r.length, 0);

/** A fresh `lockstep pair host` on host A's address (the old primary's host back). */
async function restartHostA(t: { after(fn: () => unknown): void }, p: Pair, sec: string[]): Promise<Proc> {
  const hostA = runIn(p.net.a.ns, ['pair', 'host', '--listen', `${p.net.a.ip}:${QMP_PORT}`, ...sec]);
  t.after(async () => {
    hostA.child.kill('SIGKILL');
    await hostA.exited;
  });
  await until("the old primary's pair host to listen", () => {
    if (hostA.child.exitCode !== null) throw new Error(`pair host exited: ${hostA.output()}`);
    return hostA.output().includes('QMP monitor listening') ? true : undefined;
  });
  return hostA;
}

const stageWithin = (p: Pair, stage: string, ms: number) =>
  until(
    `stage ${stage}`,
    async () => {
      if (p.sup!.child.exitCode !== null) throw new Error(`the supervisor exited: ${p.sup!.output()}`);
      const st = await status(p).catch(() => undefined);
      return st?.stage === stage ? st : undefined;
    },
    ms,
  );

test("TLS, after a failover the old primary's host comes back: with no command the survivor becomes the primary over its open connection, the resync copies exactly the union of the two change records, and a failover back keeps every byte", { skip, timeout: 180_000 }, async (t) => {
  const p = await twoHosts(t, 7, 'tls');
  const certs = p.certs!;
  await supervise(p, ['--tls-dir', certs.clientDir]);
  const w = await writer(join(p.dirA, 'disk.sock'));
  await w.write(0, MiB, 0x11);
  await checkpoint(p);
  // after the checkpoint: the failover discards them, so the resync must roll them back
  const oldAlone = [[MiB / 2, 65536, 0x22], [2 * MiB + 1000, 5000, 0x23]] as const;
  for (const [o, l, b] of oldAlone) await w.write(o, l, b);
  w.client.destroy();
  p.hostA.child.kill('SIGKILL');
  await p.hostA.exited;
  await waitStage(p, 'failed-over');

  // the survivor's client: one connection from here until the survivor dies
  const s = await writer(join(p.dirB, 'disk.sock'));
  s.model.fill(0x11, 0, MiB);
  const survivorAlone = [[4 * MiB, MiB, 0x33], [9 * MiB + 100, 70_000, 0x34]] as const;
  for (const [o, l, b] of survivorAlone) await s.write(o, l, b);
  // the supervisor says it waits for the old primary's daemon, and since when
  const waiting = await until('the wait for the old primary in the status', async () => {
    const st = await status(p);
    return (st['waiting-for-peer']?.attempts ?? 0) >= 1 ? st : undefined;
  });
  assert.equal(waiting.stage, 'failed-over');
  assert.equal(waiting['waiting-for-peer']!.side, 'primary');
  assert.equal(waiting['waiting-for-peer']!.address, `${p.net.a.ip}:${QMP_PORT}`);
  assert.ok(Date.parse(waiting['waiting-for-peer']!.since) <= Date.now());

  // the two change records as their files hold them: the old primary's (what its daemon loads
  // when it comes back) and the survivor's (a superset of what its daemon holds)
  const rd = await startDaemon(t, tempDir(t), []);
  const rc = await rd.client();
  const readLog = async (f: string) => ((await rc.execute('x-dirty-log-read', { filename: f })) as { extents: ByteRange[] }).extents;
  const oldRecord = await readLog(join(p.dirA, 'primary.qcow2.dirty'));
  const survivorFile = await readLog(join(p.dirB, 'secondary.qcow2.dirty'));
  const written = unionExtents([...oldAlone, ...survivorAlone].map(([o, l]) => granules(o, l)));
  assert.ok(within(oldAlone.map(([o, l]) => granules(o, l)), oldRecord), JSON.stringify(oldRecord));

  // the old primary's host is back; nobody runs a command
  await restartHostA(t, p, ['--tls-dir', certs.bothDir]);
  const st = await stageWithin(p, 'protected', 90_000);
  assert.match(p.sup!.output(), /the primary daemon answers again: re-protecting/);
  assert.equal(st['waiting-for-peer'], undefined);
  assert.equal(st['primary-side'], 'secondary');
  assert.equal(st.sides?.secondary.role, 'Primary');
  assert.equal(st.disks?.primary?.generation, st.disks?.secondary?.generation);
  // one pass, nothing written meanwhile: it copied the union of the two records, no more
  // (only regions of the two records) and no less (the old primary's whole record, and
  // every granule either side wrote after the checkpoint)
  const lr = st['last-reprotect']!;
  assert.equal(lr.passes.length, 1, JSON.stringify(lr));
  assert.equal(lr['barrier-bytes'], 0);
  const union = lr.union!;
  assert.ok(within(union, unionExtents(oldRecord, survivorFile)), `copied ${JSON.stringify(union)}: not only the records' regions`);
  assert.ok(within(unionExtents(oldRecord, written), union), `copied ${JSON.stringify(union)}: a region of the records is missing`);
  const p0 = lr.passes[0]!;
  assert.equal(p0.bytes, bytesOf(union));
  assert.equal(p0['data-bytes'] + p0['zeroed-bytes'] + p0['skipped-zero-bytes'], bytesOf(union), "the job's counters add up to the union");
  assert.ok(bytesOf(union) <= 3 * MiB, `${bytesOf(union)} bytes copied: the records, not the ${SIZE}-byte disk`);
  t.diagnostic(`re-protected by itself after ${st['last-reprotect'] ? 'the wait' : '?'}: union ${JSON.stringify(union)} (old primary's record ${JSON.stringify(oldRecord)}, survivor's file ${JSON.stringify(survivorFile)}); pass 0 ${JSON.stringify(p0)}`);

  // the same connection reads the survivor's bytes and writes on, replicated the new way
  assert.equal(firstDiff(await s.client.read(0, SIZE), s.model), -1);
  await s.write(6 * MiB, MiB, 0x44);
  await checkpoint(p);
  const atCheckpoint = Buffer.from(s.model);
  await s.write(8 * MiB, 65536, 0x55); // after the checkpoint: lost with the new primary
  s.client.destroy();
  p.hostB.child.kill('SIGKILL');
  await p.hostB.exited;
  const back = await waitStage(p, 'failed-over');
  assert.deepEqual(back.serving, [`nbd+unix:///disk?socket=${join(p.dirA, 'disk.sock')}`]);
  const got = await readDisk(join(p.dirA, 'disk.sock'));
  assert.equal(firstDiff(got, atCheckpoint), -1, "the old primary's disk, resynced and recovered, is the new primary's at its checkpoint");
});

const qemuRead = (image: string, dir: string): Buffer => {
  const raw = join(dir, `read-${Math.random().toString(16).slice(2)}.raw`);
  execFileSync('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', image, raw]);
  try {
    return readFileSync(raw);
  } finally {
    rmSync(raw, { force: true });
  }
};

const sbSkip = skip || (requireTool('qemu-img') ? false : 'needs qemu-img');

/** Fencing off, the link cut, both sides write, the link healed: the running pair's finding,
 *  checked (nothing copied, the survivor serves on, the old primary fenced). */
async function liveSplitBrain(t: { after(fn: () => unknown): void; diagnostic(m: string): void }, id: number) {
  const p = await twoHosts(t, id, 'insecure');
  await supervise(p, ['--insecure', '--lease', 'off', '--flush-commit', 'off']);
  const w = await writer(join(p.dirA, 'disk.sock'));
  t.after(() => w.client.destroy());
  await w.write(0, MiB, 0x11);
  await checkpoint(p);
  p.net.cut();
  await waitStage(p, 'failed-over');
  assert.match(p.sup!.output(), /failed over without fencing the old primary/);
  // nothing fences the old primary: its client's writes are acknowledged, as the survivor's
  await w.write(3 * MiB, 2 * G, 0x66);
  const s = await writer(join(p.dirB, 'disk.sock'));
  t.after(() => s.client.destroy());
  s.model.fill(0x11, 0, MiB);
  await s.write(5 * MiB, MiB, 0x77);
  const oldBefore = Buffer.from(w.model);
  const survivorBefore = Buffer.from(s.model);
  p.net.heal();

  const st = await stageWithin(p, 'split-brain', 90_000);
  t.diagnostic(`split brain found while serving: ${JSON.stringify(st['split-brain'])}`);
  assert.deepEqual(st['split-brain']?.['changed-bytes'], { primary: 2 * G, secondary: MiB });
  assert.match(st['split-brain']!.reason, /the secondary disk took over from generation \w+ without fencing the primary/);
  assert.match(st['last-error'] ?? '', /split brain: .* the secondary daemon serves on/);
  // the survivor serves on through the same connection; the old primary stands alone
  assert.deepEqual(st.serving, [`nbd+unix:///disk?socket=${join(p.dirB, 'disk.sock')}`]);
  assert.equal(st.role, 'secondary serving');
  assert.deepEqual([st.sides?.secondary.role, st.sides?.primary.role], ['Primary', 'Secondary']);
  // nothing was copied either way
  assert.equal(firstDiff(await s.client.read(0, SIZE), survivorBefore), -1, "the survivor's disk changed");
  assert.equal(firstDiff(await w.client.read(0, SIZE), oldBefore), -1, "the old primary's disk changed");
  // the old primary, which may be behind, acknowledges no write any more
  await assert.rejects(w.write(7 * MiB, 4096, 0x88));
  assert.equal(firstDiff(await w.client.read(0, SIZE), oldBefore), -1);
  const check = await runLockstep(['pair', 'status', '--check', '--control', p.control]);
  assert.equal(check.code, 8, check.stdout + check.stderr);
  await s.write(10 * MiB, G, 0x99); // the survivor's clients go on meanwhile
  return { p, w, s, oldBefore };
}

test('fencing off, the link cut, both sides write, the link healed: the running pair finds the split brain when the old primary answers, copies nothing (both disks byte for byte as they were), the survivor serves on and the old primary takes no more writes; resolve --keep the survivor saves the other disk and re-protects live', { skip: sbSkip, timeout: 180_000 }, async (t) => {
  const { p, s, oldBefore } = await liveSplitBrain(t, 8);
  const r = await runLockstep(['pair', 'resolve', '--keep', 'secondary', '--json', '--control', p.control]);
  assert.equal(r.code, 0, r.stderr + p.sup!.output());
  const res = JSON.parse(r.stdout) as { saved: { side: string; image: string }; copied: { extents: ByteRange[]; bytes: number }; status: PairStatus };
  assert.equal(res.saved.side, 'primary');
  assert.equal(join(res.saved.image, '..'), p.dirA, "saved on the old primary's host, beside its disk");
  assert.equal(firstDiff(qemuRead(res.saved.image, p.root), oldBefore), -1, "the saved image is the old primary's disk as it was");
  assert.ok(within([granules(3 * MiB, 2 * G), granules(5 * MiB, MiB), granules(10 * MiB, G)], res.copied.extents), JSON.stringify(res.copied.extents));
  assert.equal(res.status.stage, 'protected');
  assert.equal(res.status['primary-side'], 'secondary');
  assert.equal(firstDiff(await s.client.read(0, SIZE), s.model), -1, 'the same connection reads the kept bytes');
  // a failover back serves the survivor's bytes at the checkpoint from the old primary's disk
  await checkpoint(p);
  const atCheckpoint = Buffer.from(s.model);
  s.client.destroy();
  p.hostB.child.kill('SIGKILL');
  await p.hostB.exited;
  await waitStage(p, 'failed-over');
  assert.equal(firstDiff(await readDisk(join(p.dirA, 'disk.sock')), atCheckpoint), -1);
});

test('the same split brain, resolve --keep the side that does not serve: the survivor stops serving, its disk is saved whole on its host, the pair is set up again and serves the old primary\'s bytes', { skip: sbSkip, timeout: 180_000 }, async (t) => {
  const { p, s, oldBefore } = await liveSplitBrain(t, 10);
  const survivorNow = Buffer.from(s.model);
  const r = await runLockstep(['pair', 'resolve', '--keep', 'primary', '--json', '--control', p.control]);
  assert.equal(r.code, 0, r.stderr + p.sup!.output());
  const res = JSON.parse(r.stdout) as { saved: { side: string; image: string }; copied: { extents: ByteRange[] }; status: PairStatus };
  assert.equal(res.saved.side, 'secondary');
  assert.equal(join(res.saved.image, '..'), p.dirB, "saved on the survivor's host, beside its disk");
  assert.equal(firstDiff(qemuRead(res.saved.image, p.root), survivorNow), -1, "the saved image is the survivor's disk as it was");
  assert.ok(within([granules(3 * MiB, 2 * G), granules(5 * MiB, MiB), granules(10 * MiB, G)], res.copied.extents), JSON.stringify(res.copied.extents));
  assert.equal(res.status.stage, 'protected');
  assert.equal(res.status['primary-side'], undefined, 'the daemon started as primary serves again');
  assert.deepEqual(res.status.serving, [`nbd+unix:///disk?socket=${join(p.dirA, 'disk.sock')}`]);
  // the survivor's clients were cut off
  await assert.rejects(s.client.read(0, 4096));
  assert.equal(firstDiff(await readDisk(join(p.dirA, 'disk.sock')), oldBefore), -1, "the old primary's bytes are served");
  // and replicated: a failover to the survivor's host serves them too
  await checkpoint(p);
  p.hostA.child.kill('SIGKILL');
  await p.hostA.exited;
  await waitStage(p, 'failed-over');
  assert.equal(firstDiff(await readDisk(join(p.dirB, 'disk.sock')), oldBefore), -1);
});

test("TLS, the link cut and healed: the lease fenced the old primary, whose daemon ran on with its graph; with no command the pair reads its records where they are, takes that graph down and re-protects; a failover back keeps every byte", { skip, timeout: 180_000 }, async (t) => {
  const p = await twoHosts(t, 9, 'tls');
  await supervise(p, ['--tls-dir', p.certs!.clientDir]);
  const w = await writer(join(p.dirA, 'disk.sock'));
  t.after(() => w.client.destroy());
  await w.write(0, MiB, 0x11);
  await checkpoint(p);
  await w.write(MiB / 2, 65536, 0x22); // after the checkpoint: discarded by the failover
  p.net.cut();
  await waitStage(p, 'failed-over');
  const s = await writer(join(p.dirB, 'disk.sock'));
  s.model.fill(0x11, 0, MiB);
  await s.write(4 * MiB, MiB, 0x33);
  p.net.heal();

  const st = await stageWithin(p, 'protected', 90_000);
  assert.match(p.sup!.output(), /the primary daemon ran on with its old graph \(.*colo-disk0.*\); its disk is the older one/);
  assert.equal(st['primary-side'], 'secondary');
  assert.equal(st.disks?.primary?.generation, st.disks?.secondary?.generation);
  // the old primary's export went with its graph: its client reads nothing stale any more
  await assert.rejects(w.client.read(0, 4096));
  // the 0x22 rolled back on the old disk: read after a failover back
  assert.equal(firstDiff(await s.client.read(0, SIZE), s.model), -1);
  await checkpoint(p);
  const atCheckpoint = Buffer.from(s.model);
  s.client.destroy();
  p.hostB.child.kill('SIGKILL');
  await p.hostB.exited;
  await waitStage(p, 'failed-over');
  assert.equal(firstDiff(await readDisk(join(p.dirA, 'disk.sock')), atCheckpoint), -1);
});
