// `lockstep demo`: a scripted end-to-end run of a pair on this machine. A write load goes to
// the primary's NBD export, checkpoints are taken, the primary is killed in the middle of a
// write burst, the secondary fails over, and the recovered disk is read back over NBD and
// compared byte for byte with the content at the last checkpoint: the primary's disk as read
// over NBD just after that checkpoint. (Not a model of the writes: 64 writes in flight at
// once overlap, and the device, not their completion order, decides which one lands last.)

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PairSupervisor } from './supervisor.js';
import { NbdClient } from '../nbd/client/client.js';

export interface DemoOptions {
  size: number;
  rounds: number;
  keep: boolean;
  out: (line: string) => void;
}

function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

async function readDisk(c: NbdClient, size: number): Promise<Buffer> {
  const out = Buffer.alloc(size);
  for (let off = 0; off < size; off += 4 * 2 ** 20) {
    const n = Math.min(4 * 2 ** 20, size - off);
    (await c.read(off, n)).copy(out, off);
  }
  return out;
}

export async function runDemo(o: DemoOptions): Promise<boolean> {
  const dir = mkdtempSync(join(tmpdir(), 'lockstep-demo-'));
  const sock = join(dir, 'disk.sock');
  const say = o.out;
  const sup = new PairSupervisor({
    dataDir: dir,
    size: o.size,
    checkpointIntervalMs: 0,
    // The demo's kill is seen by the daemon's exit, not by the heartbeat: a generous timeout
    // keeps a busy machine from taking a slow answer for a dead side.
    heartbeatIntervalMs: 100,
    heartbeatTimeoutMs: 3000,
    failover: 'auto',
    nbdSocket: sock,
    log: () => {},
  });
  const seed = Date.now() % 100000;
  const rand = rng(seed);
  let ok = false;
  try {
    const t0 = Date.now();
    await sup.start();
    say(`pair started in ${Date.now() - t0} ms (disk ${o.size / 2 ** 20} MiB, data in ${dir}, seed ${seed})`);
    const client = await NbdClient.connect({ address: { type: 'unix', path: sock }, exportName: 'disk' });
    const write = async (): Promise<void> => {
      const len = 4096 * (1 + Math.floor(rand() * 64));
      const off = Math.floor(rand() * ((o.size - len) / 4096)) * 4096;
      await client.write(off, Buffer.alloc(len, 1 + Math.floor(rand() * 255)));
    };
    for (let r = 1; r <= o.rounds; r++) {
      const before = Date.now();
      const batch = [];
      for (let i = 0; i < 64; i++) batch.push(write());
      await Promise.all(batch);
      const cp = await sup.checkpoint();
      say(`round ${r}: 64 writes in ${Date.now() - before} ms, checkpoint pause ${cp.pauseMs.toFixed(2)} ms (hold ${cp.holdMs.toFixed(2)}, secondary ${cp.checkpointMs.toFixed(2)}, release ${cp.releaseMs.toFixed(2)} ms)`);
    }
    // nothing is in flight: the primary's disk now is the disk at the last checkpoint
    const readAt = Date.now();
    const snapshot = await readDisk(client, o.size);
    say(`read the primary's disk at the last checkpoint over NBD (${o.size / 2 ** 20} MiB in ${Date.now() - readAt} ms)`);
    // a burst that the last checkpoint does not cover, cut short by the primary's death
    const burst = [];
    for (let i = 0; i < 256; i++) burst.push(write().catch(() => {}));
    await new Promise((r) => setTimeout(r, 5));
    const failedOver = new Promise<{ ms: number; serving: string[] }>((resolve) => sup.once('failed-over', resolve));
    const killedAt = Date.now();
    sup.crashPrimary();
    say('primary killed (SIGKILL) in the middle of a 256-write burst');
    await Promise.all(burst);
    client.disconnect().catch(() => {});
    const fo = await failedOver;
    say(`failover: recovered disk served ${Date.now() - killedAt} ms after the kill (commit ${fo.ms} ms) at ${fo.serving.join(', ')}`);
    const rc = await NbdClient.connect({ address: { type: 'unix', path: sock }, exportName: 'disk' });
    const got = await readDisk(rc, o.size);
    await rc.disconnect();
    ok = got.equals(snapshot);
    if (ok) say(`verified: the recovered disk equals the disk at the last checkpoint, byte for byte (${o.size} bytes)`);
    else {
      const at = got.findIndex((b, i) => b !== snapshot[i]);
      say(`MISMATCH: the recovered disk differs from the last checkpoint at byte ${at}`);
    }
    const st = sup.status();
    say(`checkpoints ${st.checkpoints}, pause median ${st['pause-median-ms']?.toFixed(2)} ms, p99 ${st['pause-p99-ms']?.toFixed(2)} ms`);
  } finally {
    await sup.stop();
    if (!o.keep) rmSync(dir, { recursive: true, force: true });
  }
  return ok;
}
