// bench/nbd-payload-gc: what the NBD server's payload pool saves the garbage collector
// (issue 14). One process serves a 64 MiB memory disk and writes 2 GiB to it in 1 MiB
// requests, 4 in flight, over loopback TCP: once with the server's payload pool and once
// without (payloadPool: null), alternately, counting V8's GCs by kind with
// PerformanceObserver('gc'). No QEMU twin: the figure is lockstep's own allocation.
//
// Run: npm run build && node dist/bench/nbd-payload-gc.js [rounds, default 2]

import { PerformanceObserver } from 'node:perf_hooks';
import { loadavg } from 'node:os';
import { NbdServer } from '../src/nbd/server/server.js';
import type { SocketAddress } from '../src/util/socket-address.js';
import { NbdClient } from '../src/nbd/client/client.js';
import { BlockGraph } from '../src/block/graph.js';
import { createRegistry } from '../src/block/registry.js';

const MiB = 1024 * 1024;
const GC_KIND: Record<number, string> = { 1: 'scavenge', 2: 'mark-compact', 4: 'incremental', 8: 'weak-callbacks' };

async function run(pool: boolean): Promise<string> {
  const gcs: Array<{ kind: number; ms: number }> = [];
  const obs = new PerformanceObserver((l) => {
    for (const e of l.getEntries()) gcs.push({ kind: (e as unknown as { detail: { kind: number } }).detail.kind, ms: e.duration });
  });
  obs.observe({ entryTypes: ['gc'] });
  const graph = new BlockGraph(createRegistry());
  const node = await graph.open({ driver: 'memory', size: 64 * MiB, 'node-name': 'd' }, { monitorOwned: true });
  const server = new NbdServer({ graph, ...(pool ? {} : { payloadPool: null }) });
  const addr = (await server.listen({ type: 'inet', host: '127.0.0.1', port: 0 })) as Extract<SocketAddress, { type: 'inet' }>;
  server.addExport({ name: 'x', node, writable: true });
  const c = await NbdClient.connect({ address: { type: 'inet', host: '127.0.0.1', port: addr.port }, exportName: 'x' });
  const buf = Buffer.alloc(MiB, 7);
  const t0 = performance.now();
  for (let i = 0; i < 2048; i += 4) await Promise.all([0, 1, 2, 3].map((k) => c.write(((i + k) % 64) * MiB, buf)));
  const s = (performance.now() - t0) / 1000;
  obs.disconnect();
  await c.disconnect();
  await server.close();
  await graph.closeAll();
  const kinds = [...new Set(gcs.map((g) => g.kind))].sort().map((k) => {
    const of = gcs.filter((g) => g.kind === k);
    return `${GC_KIND[k] ?? k} ${of.length} (max ${Math.max(...of.map((g) => g.ms)).toFixed(1)} ms)`;
  });
  return `${pool ? 'pool   ' : 'no pool'}  ${(2048 / s).toFixed(0).padStart(5)} MB/s  ${kinds.join(', ') || 'no GC'}`;
}

const rounds = Number(process.argv[2] ?? '2');
console.log(`bench/nbd-payload-gc: 2 GiB in 1 MiB writes, load ${loadavg().map((l) => l.toFixed(1)).join(' ')}`);
for (let r = 0; r < rounds; r++) for (const pool of [false, true]) console.log(await run(pool));
