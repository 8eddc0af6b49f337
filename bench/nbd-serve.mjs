// Serves a raw file over NBD with lockstep's server (the bench's lockstep side).
// usage: node bench/nbd-serve.mjs <file> <port|unix-path> [multi-conn: on|auto]
import { BlockGraph } from '../dist/src/block/graph.js';
import { createRegistry } from '../dist/src/block/registry.js';
import { NbdServer } from '../dist/src/nbd/server/server.js';

const [file, where, multiConn = 'auto'] = process.argv.slice(2);
const graph = new BlockGraph(createRegistry());
const node = await graph.open({ driver: 'raw', 'node-name': 'disk', file: { driver: 'file', filename: file, locking: 'off' } });
const server = new NbdServer({ graph });
const addr = /^\d+$/.test(where) ? { type: 'inet', host: '127.0.0.1', port: Number(where) } : { type: 'unix', path: where };
await server.listen(addr);
server.addExport({ name: '', node, writable: true, multiConn });
process.stdout.write('ready\n');
const stop = async () => {
  await server.close();
  await graph.closeAll();
  process.exit(0);
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
