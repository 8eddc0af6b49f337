// NBD server and block export commands: nbd-server-start/-add/-remove/-stop,
// block-export-add/-del, query-block-exports. The state lives in the daemon's ExportTable.

import { InvalidArgumentError } from '../../errors.js';
import { command, type QmpCommand } from '../dispatch.js';
import { BLOCK_EXPORT_ADD, BLOCK_EXPORT_DEL, NBD_SERVER_ADD, NBD_SERVER_REMOVE, NBD_SERVER_START } from '../schema/nbd.js';
import { NO_ARGS } from '../schema/misc.js';
import type { SocketAddress } from '../../util/socket-address.js';

/** SocketAddress (flat) or SocketAddressLegacy's data -> a listen address. */
export function toListenAddress(type: string, data: Record<string, unknown>): SocketAddress {
  if (type === 'unix') {
    if (data.abstract === true) throw new InvalidArgumentError('Abstract Unix sockets are not supported by lockstep');
    return { type: 'unix', path: data.path as string };
  }
  if (type === 'inet') {
    const portText = String(data.port);
    if (!/^\d+$/.test(portText) || Number(portText) > 65535) throw new InvalidArgumentError(`Port '${portText}' is not a number in 0..65535`);
    return { type: 'inet', host: data.host as string, port: Number(portText) };
  }
  throw new InvalidArgumentError(`Socket address type '${type}' is not supported by lockstep`);
}

export const nbdCommands: readonly QmpCommand[] = [
  command('nbd-server-start', NBD_SERVER_START, async (ctx, args) => {
    if (args['tls-authz'] !== undefined) throw new InvalidArgumentError(`Parameter 'tls-authz' is not supported by lockstep`);
    await ctx.exports.startNbd({
      addrs: [toListenAddress(args.addr.type, args.addr.data)],
      ...(args['tls-creds'] !== undefined ? { tlsCreds: args['tls-creds'] } : {}),
      ...(args['max-connections'] !== undefined ? { maxConnections: args['max-connections'] } : {}),
      ...(args['x-idle-timeout'] !== undefined ? { idleTimeout: args['x-idle-timeout'] } : {}),
    });
  }),
  // lockstep extension: one more listener for the running server (a Unix socket and a TCP
  // port at once, as `lockstep pair` serves the disk)
  command('x-nbd-server-listen', { addr: NBD_SERVER_START.addr }, async (ctx, args) => {
    await ctx.exports.addListener(toListenAddress(args.addr.type, args.addr.data));
    return {};
  }),
  command('nbd-server-add', NBD_SERVER_ADD, (ctx, args) => {
    if (args.bitmap !== undefined) throw new InvalidArgumentError(`Bitmap '${args.bitmap}' is not found`);
    const device = args.device;
    const node = ctx.graph.find(device); // QEMU looks the device up before it checks the server
    if (!ctx.exports.nbdRunning) throw new InvalidArgumentError('NBD server not running');
    const name = args.name ?? device;
    ctx.exports.add({
      id: name,
      nodeName: node.name,
      name,
      writable: args.writable ?? false,
      ...(args.description !== undefined ? { description: args.description } : {}),
    });
  }),
  command('nbd-server-remove', NBD_SERVER_REMOVE, (ctx, args) => ctx.exports.del(args.name, args.mode ?? 'safe')),
  command('nbd-server-stop', NO_ARGS, (ctx) => ctx.exports.stopNbd()),
  command('block-export-add', BLOCK_EXPORT_ADD, (ctx, args) => {
    // QEMU's id_wellformed: a letter, then letters, digits, '-', '.', '_'
    if (!/^[A-Za-z][A-Za-z0-9_.-]*$/.test(args.id)) throw new InvalidArgumentError('Invalid block export id');
    if (args.type !== 'nbd') throw new InvalidArgumentError(`Export type '${args.type}' is not supported by lockstep`);
    if (args.bitmaps?.length) throw new InvalidArgumentError(`Bitmap '${args.bitmaps[0]}' is not found`);
    if (args.iothread !== undefined) throw new InvalidArgumentError(`Parameter 'iothread' is not supported by lockstep`);
    ctx.exports.add({
      id: args.id,
      nodeName: args['node-name'],
      ...(args.name !== undefined ? { name: args.name } : {}),
      writable: args.writable ?? false,
      ...(args.description !== undefined ? { description: args.description } : {}),
    });
  }),
  command('block-export-del', BLOCK_EXPORT_DEL, (ctx, args) => ctx.exports.del(args.id, args.mode ?? 'safe')),
  command('query-block-exports', NO_ARGS, (ctx) => ctx.exports.query()),
];
