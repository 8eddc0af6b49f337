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
// Write-zeroes and discards longer than ZERO_PIECE are sent as pieces of that size, one after
// the other: what the server does for one request stays bounded (a replication secondary
// saves the old content of every piece first), and each piece's reply is progress for
// x-io-timeout, which one whole-disk request with gigabytes to save would outlast (issue 14:
// the forward of one 1 GiB discard was declared lost after 1 s and the pair's secondary
// missed every write after it).

import { makeCaps, type BlockDriver, type BlockStatus, type NodeCaps, type NodeImpl, type WriteFlags, type ZeroFlags } from '../driver.js';
import { BlockError, InvalidArgumentError, errorMessage } from '../../errors.js';
import { NbdClient, type NbdClientOptions } from '../../nbd/client/client.js';
import type { ExportDetails } from '../../nbd/client/handshake.js';
import { STATE_HOLE, STATE_ZERO, TFLAG } from '../../nbd/protocol.js';
import { clientTlsConfig, isTlsCreds } from '../../nbd/tls.js';
import type { OptionReader } from '../options.js';
import type { SocketAddress } from '../../util/socket-address.js';

const RETRY_INTERVAL_MS = 1000;
/** The largest write-zeroes or discard sent as one request (copy-before-write's PIECE). */
export const ZERO_PIECE = 64 * 1024 * 1024;

/** Runs `op` on [offset, offset+length) in pieces of at most ZERO_PIECE, in order. */
async function inPieces(offset: number, length: number, op: (offset: number, length: number) => Promise<void>): Promise<void> {
  if (length <= ZERO_PIECE) return op(offset, length);
  for (let pos = offset, end = offset + length; pos < end; pos += ZERO_PIECE) await op(pos, Math.min(ZERO_PIECE, end - pos));
}

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

/** Connects, retrying for open-timeout seconds (0: one attempt). */
async function connectWithRetry(copts: NbdClientOptions, openTimeout: number, where: string, exportName: string): Promise<NbdClient> {
  const deadline = Date.now() + openTimeout * 1000;
  for (;;) {
    try {
      return await NbdClient.connect(copts);
    } catch (e) {
      if (Date.now() + RETRY_INTERVAL_MS > deadline) {
        throw new InvalidArgumentError(`Failed to connect to NBD server '${where}' (export '${exportName}'): ${errorMessage(e)}`);
      }
      await sleep(RETRY_INTERVAL_MS);
    }
  }
}

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
    const client = await connectWithRetry(copts, openTimeout, where, exportName);
    if (client.readOnly && !ctx.readOnly) {
      client.destroy();
      throw new InvalidArgumentError(`Read-only NBD export '${exportName}' on '${where}' cannot be opened read-write`);
    }
    return new NbdNode(copts, address, exportName, where, reconnectDelay, client);
  },
};

/**
 * The state of an open nbd node: the live client, and after a lost connection the
 * reconnection in progress and the requests waiting for it (up to reconnect-delay).
 */
class NbdNode implements NodeImpl {
  readonly caps: NodeCaps;
  readonly filename: string;
  /** the export as negotiated at open: a reconnection must offer the same size */
  private readonly first: ExportDetails;
  private closed = false;
  private lostAt: number | null = null;
  private reconnecting: Promise<void> | null = null;
  private readonly waiters = new Set<() => void>();

  constructor(
    private readonly copts: NbdClientOptions,
    private readonly address: SocketAddress<number | string>,
    private readonly exportName: string,
    private readonly where: string,
    private readonly reconnectDelay: number,
    private client: NbdClient,
  ) {
    const first = client.info;
    this.first = first;
    const f = first.flags;
    this.caps = makeCaps({
      requestAlignment: first.minBlockSize,
      maxTransfer: first.maxPayload - (first.maxPayload % first.minBlockSize),
      fua: (f & TFLAG.SEND_FUA) !== 0,
      writeZeroes: (f & TFLAG.SEND_WRITE_ZEROES) !== 0,
      discard: (f & TFLAG.SEND_TRIM) !== 0,
      blockStatus: first.baseAllocationId !== null,
    });
    this.filename =
      address.type === 'unix' ? `nbd+unix:///${exportName}?socket=${address.path}` : `nbd://${address.host}:${address.port}/${exportName}`;
    this.attach(client);
  }

  private wakeAll(): void {
    for (const w of this.waiters) w();
    this.waiters.clear();
  }

  private async reconnectLoop(): Promise<void> {
    while (!this.closed) {
      try {
        const c = await NbdClient.connect({ ...this.copts, connectTimeoutMs: Math.max(1000, this.reconnectDelay * 1000) });
        if (this.closed) {
          c.destroy();
          return;
        }
        if (c.info.size !== this.first.size) {
          c.destroy();
          throw new Error(`export size changed from ${this.first.size} to ${c.info.size}`);
        }
        this.attach(c);
        this.lostAt = null;
        this.wakeAll();
        return;
      } catch {
        await sleep(RETRY_INTERVAL_MS);
      }
    }
  }

  private attach(c: NbdClient): void {
    this.client = c;
    c.onDead = () => {
      if (this.closed || this.reconnectDelay === 0) return;
      this.lostAt = Date.now();
      this.reconnecting = this.reconnectLoop().finally(() => (this.reconnecting = null));
      // Requests waiting for a reconnection give up when the delay runs out.
      setTimeout(() => this.wakeAll(), this.reconnectDelay * 1000 + 10).unref();
    };
  }

  /** The live client, waiting up to reconnect-delay after a lost connection. */
  private async live(): Promise<NbdClient> {
    for (;;) {
      if (this.closed) throw new BlockError('ENOMEDIUM', 'NBD node is closed');
      if (this.client.alive) return this.client;
      if (this.lostAt === null || Date.now() >= this.lostAt + this.reconnectDelay * 1000) {
        throw new BlockError('EIO', `NBD server '${this.where}' is not connected`);
      }
      await new Promise<void>((r) => this.waiters.add(r));
    }
  }

  /** Runs a request; one lost connection within reconnect-delay is retried on the new one. */
  private async run<T>(op: (c: NbdClient) => Promise<T>): Promise<T> {
    const c = await this.live();
    try {
      return await op(c);
    } catch (e) {
      if (this.reconnectDelay > 0 && !c.alive && e instanceof BlockError && e.code === 'EIO') return op(await this.live());
      throw e;
    }
  }

  getLength(): number {
    return this.first.size;
  }

  read(offset: number, length: number): Promise<Buffer> {
    return this.run((c) => c.read(offset, length));
  }

  write(offset: number, data: Buffer, flags: WriteFlags): Promise<void> {
    return this.run((c) => c.write(offset, data, { fua: flags.fua ?? false }));
  }

  writeZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    return inPieces(offset, length, (o, n) =>
      this.run((c) => {
        if (flags.noFallback && !(c.info.flags & TFLAG.SEND_FAST_ZERO)) throw new BlockError('ENOTSUP', 'NBD server has no fast zeroing');
        return c.writeZeroes(o, n, { fua: flags.fua ?? false, noHole: !flags.mayUnmap, fastZero: flags.noFallback ?? false });
      }),
    );
  }

  discard(offset: number, length: number): Promise<void> {
    return inPieces(offset, length, (o, n) => this.run((c) => c.trim(o, n)));
  }

  flush(): Promise<void> {
    return this.first.flags & TFLAG.SEND_FLUSH ? this.run((c) => c.flush()) : Promise.resolve();
  }

  blockStatus(offset: number, length: number): Promise<BlockStatus> {
    return this.run(async (c) => {
      const ext = await c.blockStatus(offset, length, { reqOne: true });
      const e = ext[0];
      if (!e || e.length === 0) throw new BlockError('EIO', 'NBD server sent an empty block status');
      return { length: Math.min(e.length, length), allocated: true, data: (e.flags & STATE_HOLE) === 0, zero: (e.flags & STATE_ZERO) !== 0 };
    });
  }

  async close(): Promise<void> {
    this.closed = true;
    this.wakeAll();
    await this.reconnecting;
    if (this.client.alive) await this.client.disconnect();
    else this.client.destroy();
  }

  info(): Record<string, unknown> {
    const { first } = this;
    return { server: this.address, export: this.exportName, size: first.size, flags: first.flags, connected: this.client.alive };
  }
}
