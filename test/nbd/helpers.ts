// Shared set-up for NBD tests: a graph with memory nodes served by an NbdServer.
import type { TestContext } from 'node:test';
import { join } from 'node:path';
import { newGraph, tempDir } from '../helpers/graph.js';
import { NbdServer, type NbdServerOptions } from '../../src/nbd/server/server.js';
import type { BlockGraph } from '../../src/block/graph.js';
import type { BlockNode } from '../../src/block/node.js';
import type { SocketAddress } from '../../src/util/socket-address.js';

export interface Served {
  graph: BlockGraph;
  server: NbdServer;
  node: BlockNode;
  tcp: SocketAddress & { type: 'inet' };
  unix: SocketAddress & { type: 'unix' };
  dir: string;
}

export async function serveMemory(
  t: TestContext,
  opts: { size?: number; writable?: boolean; name?: string; server?: Partial<NbdServerOptions> } = {},
): Promise<Served> {
  const graph = newGraph();
  const dir = tempDir(t, 'lockstep-nbd-');
  const node = await graph.open({ driver: 'memory', size: opts.size ?? 1 << 20, 'node-name': 'disk' }, { monitorOwned: true });
  const server = new NbdServer({ graph, ...opts.server });
  const tcp = (await server.listen({ type: 'inet', host: '127.0.0.1', port: 0 })) as SocketAddress & { type: 'inet' };
  const unix = (await server.listen({ type: 'unix', path: join(dir, 'nbd.sock') })) as SocketAddress & { type: 'unix' };
  server.addExport({ name: opts.name ?? 'disk0', node, writable: opts.writable ?? true, description: 'test disk' });
  t.after(async () => {
    await server.close();
    await graph.closeAll();
  });
  return { graph, server, node, tcp, unix, dir };
}

export function patterned(length: number, seed = 1): Buffer {
  const b = Buffer.allocUnsafe(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = x & 0xff;
  }
  return b;
}
