// Format probing for an image named by a file name (qemu-img and qemu-io without -f, a qcow2
// header's backing file without a backing format): qcow2 by its magic, else raw. lockstep
// probes no other format, and never through the network.

import { open as fsOpen } from 'node:fs/promises';
import { InvalidArgumentError, strerror } from '../errors.js';
import { QCOW2_MAGIC } from './drivers/qcow2/header.js';

/** Format of a host file from its first bytes: qcow2 by its magic, else raw. */
export function probeFormatFromHeader(header: Buffer): 'qcow2' | 'raw' {
  return header.length >= 4 && header.readUInt32BE(0) === QCOW2_MAGIC ? 'qcow2' : 'raw';
}

/**
 * Reads the start of `filename` and guesses its format. A missing or unreadable file
 * gives QEMU's "Could not open 'x': <strerror>".
 */
export async function probeFormat(filename: string): Promise<'qcow2' | 'raw'> {
  let fh;
  try {
    fh = await fsOpen(filename, 'r');
  } catch (e) {
    throw new InvalidArgumentError(`Could not open '${filename}': ${strerror(e)}`);
  }
  try {
    const buf = Buffer.alloc(4);
    const { bytesRead } = await fh.read(buf, 0, 4, 0);
    return probeFormatFromHeader(buf.subarray(0, bytesRead));
  } catch (e) {
    throw new InvalidArgumentError(`Could not read '${filename}': ${strerror(e)}`);
  } finally {
    await fh.close();
  }
}
