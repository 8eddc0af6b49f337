// Protocol driver "nbd": an NBD export as a node, with QEMU's option names:
//   server.type=inet|unix, server.host, server.port, server.path, export, tls-creds (id of a
//   tls-creds-x509 object in graph.objects, endpoint=client), tls-hostname,
//   reconnect-delay (seconds: after a lost connection, requests wait this long for a
//   reconnection; 0 = fail at once with EIO), open-timeout (seconds to keep retrying the
//   first connection; 0 = one attempt), and lockstep's x-io-timeout (seconds without any reply
//   while requests are outstanding before the connection counts as lost; 0 = wait forever,
//   as QEMU does).
// Negotiates structured replies and base:allocation when the server offers them; block
// status answers from base:allocation. Requests are pipelined on one connection.

import { makeCaps, type BlockDriver, type BlockStatus, type NodeImpl } from '../driver.js';
import { BlockError, InvalidArgumentError, errorMessage } from '../../errors.js';
import { NbdClient, type NbdClientOptions } from '../../nbd/client/client.js';
import { STATE_HOLE, STATE_ZERO, TFLAG } from '../../nbd/protocol.js';
import { clientTlsConfig, isTlsCreds } from '../../nbd/tls.js';
import type { OptionReader } from '../options.js';
import type { SocketAddress } from '../../util/socket-address.js';

const RETRY_INTERVAL_MS = 1000;

function readAddress(o: OptionReader): SocketAddress<number | string> {
  const srv = o.sub('server', true);
  const type = srv.enumOf('type', ['inet', 'unix'], true);
  let addr: SocketAddress<number | string>;
  if (type === 'inet') {
    const host = srv.string('host', true);
    const portRaw = srv.raw('port');
    if (portRaw === undefined) throw new InvalidArgumentError(`Parameter '${srv.path('port')}' is missing`);
    const port = typeof portRaw === 'number' ? portRaw : typeof portRaw === 'string' && /^\d+$/.test(portRaw) ? Number(portRaw) : NaN;
    if (!Number.isInteger(port) || port < 1 || port > 65535) throw new InvalidArgumentError(`Parameter '${srv.path('port')}' expects a port number`);
    srv.bool('numeric');
    srv.bool('ipv4');
    srv.bool('ipv6');
    addr = { type: 'inet', host, port };
  } else {
    addr = { type: 'unix', path: srv.string('path', true) };
  }
  srv.done();
  return addr;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export const nbdDriver: BlockDriver = {
  name: 'nbd',
  kind: 'protocol',
  async open(ctx, o): Promise<NodeImpl> {
    const address = readAddress(o);
    const exportName = o.string('export') ?? '';
    const credsId = o.string('tls-creds');
    const tlsHostname = o.string('tls-hostname');
    const reconnectDelay = o.uint('reconnect-delay') ?? 0;
    const openTimeout = o.uint('open-timeout') ?? 0;
    const ioTimeout = o.uint('x-io-timeout') ?? 0;
    if (o.has('x-dirty-bitmap')) throw new InvalidArgumentError(`Parameter 'x-dirty-bitmap' is not supported by lockstep`);
    o.done();

    const copts: NbdClientOptions = { address, exportName, ...(ioTimeout > 0 ? { ioTimeoutMs: ioTimeout * 1000 } : {}) };
    if (credsId !== undefined) {
      const creds = ctx.graph.objects.get(credsId);
      if (creds === undefined) throw new InvalidArgumentError(`No TLS credentials with id '${credsId}'`);
      if (!isTlsCreds(creds)) throw new InvalidArgumentError(`Object with id '${credsId}' is not TLS credentials`);
      copts.tls = clientTlsConfig(creds, tlsHostname);
    }

    const where = address.type === 'unix' ? address.path : `${address.host}:${address.port}`;
    let client: NbdClient;
    const deadline = Date.now() + openTimeout * 1000;
    for (;;) {
      try {
        client = await NbdClient.connect(copts);
        break;
      } catch (e) {
        if (Date.now() + RETRY_INTERVAL_MS > deadline) {
          throw new InvalidArgumentError(`Failed to connect to NBD server '${where}' (export '${exportName}'): ${errorMessage(e)}`);
        }
        await sleep(RETRY_INTERVAL_MS);
      }
    }
    const first = client.info;
    if (client.readOnly && !ctx.readOnly) {
      client.destroy();
      throw new InvalidArgumentError(`Read-only NBD export '${exportName}' on '${where}' cannot be opened read-write`);
    }

    let closed = false;
    let lostAt: number | null = null;
    let reconnecting: Promise<void> | null = null;
    const waiters = new Set<() => void>();
    const wakeAll = (): void => {
      for (const w of waiters) w();
      waiters.clear();
    };

    async function reconnectLoop(): Promise<void> {
      while (!closed) {
        try {
          const c = await NbdClient.connect({ ...copts, connectTimeoutMs: Math.max(1000, reconnectDelay * 1000) });
          if (closed) {
            c.destroy();
            return;
          }
          if (c.info.size !== first.size) {
            c.destroy();
            throw new Error(`export size changed from ${first.size} to ${c.info.size}`);
          }
          attach(c);
          lostAt = null;
          wakeAll();
          return;
        } catch {
          await sleep(RETRY_INTERVAL_MS);
        }
      }
    }

    function attach(c: NbdClient): void {
      client = c;
      c.onDead = () => {
        if (closed || reconnectDelay === 0) return;
        lostAt = Date.now();
        reconnecting = reconnectLoop().finally(() => (reconnecting = null));
        // Requests waiting for a reconnection give up when the delay runs out.
        setTimeout(wakeAll, reconnectDelay * 1000 + 10).unref();
      };
    }
    attach(client);

    /** The live client, waiting up to reconnect-delay after a lost connection. */
    async function live(): Promise<NbdClient> {
      for (;;) {
        if (closed) throw new BlockError('ENOMEDIUM', 'NBD node is closed');
        if (client.alive) return client;
        if (lostAt === null || Date.now() >= lostAt + reconnectDelay * 1000) {
          throw new BlockError('EIO', `NBD server '${where}' is not connected`);
        }
        await new Promise<void>((r) => waiters.add(r));
      }
    }

    /** Runs a request; one lost connection within reconnect-delay is retried on the new one. */
    async function run<T>(op: (c: NbdClient) => Promise<T>): Promise<T> {
      const c = await live();
      try {
        return await op(c);
      } catch (e) {
        if (reconnectDelay > 0 && !c.alive && e instanceof BlockError && e.code === 'EIO') return op(await live());
        throw e;
      }
    }

    const f = first.flags;
    return {
      caps: makeCaps({
        requestAlignment: first.minBlockSize,
        maxTransfer: first.maxPayload - (first.maxPayload % first.minBlockSize),
        fua: (f & TFLAG.SEND_FUA) !== 0,
        writeZeroes: (f & TFLAG.SEND_WRITE_ZEROES) !== 0,
        discard: (f & TFLAG.SEND_TRIM) !== 0,
        blockStatus: first.baseAllocationId !== null,
      }),
      filename: address.type === 'unix' ? `nbd+unix:///${exportName}?socket=${address.path}` : `nbd://${address.host}:${address.port}/${exportName}`,
      getLength: () => first.size,
      read: (offset, length) => run((c) => c.read(offset, length)),
      write: (offset, data, flags) => run((c) => c.write(offset, data, { fua: flags.fua ?? false })),
      writeZeroes: (offset, length, flags) =>
        run((c) => {
          if (flags.noFallback && !(c.info.flags & TFLAG.SEND_FAST_ZERO)) throw new BlockError('ENOTSUP', 'NBD server has no fast zeroing');
          return c.writeZeroes(offset, length, { fua: flags.fua ?? false, noHole: !flags.mayUnmap, fastZero: flags.noFallback ?? false });
        }),
      discard: (offset, length) => run((c) => c.trim(offset, length)),
      flush: () => (f & TFLAG.SEND_FLUSH ? run((c) => c.flush()) : Promise.resolve()),
      blockStatus: (offset, length): Promise<BlockStatus> =>
        run(async (c) => {
          const ext = await c.blockStatus(offset, length, { reqOne: true });
          const e = ext[0];
          if (!e || e.length === 0) throw new BlockError('EIO', 'NBD server sent an empty block status');
          return { length: Math.min(e.length, length), allocated: true, data: (e.flags & STATE_HOLE) === 0, zero: (e.flags & STATE_ZERO) !== 0 };
        }),
      close: async () => {
        closed = true;
        wakeAll();
        await reconnecting;
        if (client.alive) await client.disconnect();
        else client.destroy();
      },
      info: () => ({ server: address, export: exportName, size: first.size, flags: first.flags, connected: client.alive }),
    };
  },
};
