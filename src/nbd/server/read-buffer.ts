// Socket reads into one reused buffer per connection, instead of a new buffer per read
// (issue 14, docs/benchmarks.md "pair latency", run G).
//
// Node gives each socket read a fresh ArrayBuffer (64 KiB at most): as many bytes of external
// memory as the client sends. Those chunks die young, but V8 counts external memory allocated
// since the last full GC against the old generation's limit, and with the daemons' small
// heaps (about 8 MB old, a young generation grown to 8 MB) a few MB of them is enough to start
// incremental marking: the daemons ran a major GC (3 to 19 ms on the loop thread) for every
// 10 to 20 MB written, more major GCs than scavenges, while the heap itself did not grow.
//
// `net.connect({ onread })` reads into a buffer of the caller's, but Node 20 offers it only to
// sockets it creates, not to a server's accepted ones. Node's Socket keeps the option in three
// own symbol properties (kBuffer, kBufferCb, kBufferGen, set to null by its constructor) and
// hands the buffer to its handle (useUserBuffer); this sets the same on an accepted plain
// socket. Where any of it is missing (another Node, a TLS socket) nothing changes and the
// socket's 'data' events go on as before.

import { Socket } from 'node:net';
import { TLSSocket } from 'node:tls';
import type { Duplex } from 'node:stream';

/** one socket read at most: Node's own read size */
export const READ_BUFFER_BYTES = 64 * 1024;

/** LOCKSTEP_NBD_READ_BUFFER=off: Node's buffer per read, as before (for A/B measurements) */
const enabled = process.env.LOCKSTEP_NBD_READ_BUFFER !== 'off';

interface Handle {
  useUserBuffer?: (buf: Uint8Array) => void;
}

/** What Node's Socket keeps beside its public interface: its handle and its own symbols. */
type SocketInternals = Socket & { _handle?: Handle | null } & Record<symbol, unknown>;

/**
 * Makes `stream`'s reads land in one reused buffer and calls `onRead(bytes)` with a view of
 * each read's bytes, valid only until it returns (the next read overwrites them); pause() and
 * resume() work as before. Data the stream had already read is still emitted as 'data'.
 * False (and nothing changed) where Node's internals are not the ones expected.
 */
export function readIntoReusedBuffer(stream: Duplex, onRead: (bytes: Buffer) => void): boolean {
  if (!enabled || !(stream instanceof Socket) || stream instanceof TLSSocket) return false;
  const slots = stream as SocketInternals;
  const handle = slots._handle;
  if (!handle || typeof handle.useUserBuffer !== 'function') return false;
  const own = Object.getOwnPropertySymbols(stream);
  const sym = (name: string) => own.find((s) => s.description === name);
  const kBuffer = sym('kBuffer');
  const kBufferCb = sym('kBufferCb');
  const kBufferGen = sym('kBufferGen');
  if (!kBuffer || !kBufferCb || !kBufferGen || slots[kBuffer] !== null || slots[kBufferCb] !== null || slots[kBufferGen] !== null) return false;
  const buf = Buffer.allocUnsafeSlow(READ_BUFFER_BYTES);
  slots[kBuffer] = buf;
  slots[kBufferGen] = null;
  slots[kBufferCb] = (nread: number): void => {
    onRead(buf.subarray(0, nread));
  };
  handle.useUserBuffer(buf);
  return true;
}
