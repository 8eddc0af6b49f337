// `lockstep img rebase -u`: changes the backing file name (and format) recorded in a qcow2
// header without touching data, as qemu-img's unsafe rebase does. The header cluster is
// rewritten in one write: header fields, header extensions with the backing-format
// extension replaced, then the backing file name, all within the first cluster. The header
// and its extensions are read by the qcow2 driver's own parser (qcow2/header.ts).

import { open as fsOpen } from 'node:fs/promises';
import { errorMessage } from '../../errors.js';
import { ImgError } from './common.js';
import {
  EXT_BACKING_FORMAT,
  EXT_END,
  QCOW2_MAGIC,
  Qcow2FormatError,
  parseHeader,
  readHeaderExtensions,
  type HeaderExtension,
  type Qcow2Header,
} from '../../block/drivers/qcow2/header.js';

export async function runRebase(filename: string, backing: string, backingFormat: string | undefined): Promise<number> {
  let fh;
  try {
    fh = await fsOpen(filename, 'r+');
  } catch (e) {
    throw new ImgError(`Could not open '${filename}': ${errorMessage(e)}`);
  }
  try {
    const head = Buffer.alloc(104);
    await fh.read(head, 0, head.length, 0);
    if (head.readUInt32BE(0) !== QCOW2_MAGIC) throw new ImgError(`Could not change the backing file to '${backing}': Operation not supported`);
    const clusterBits = head.readUInt32BE(20);
    if (clusterBits < 9 || clusterBits > 21) throw new ImgError(`Could not open '${filename}': Unsupported cluster size: 2^${clusterBits}`);
    const clusterSize = 2 ** clusterBits;
    const cluster = Buffer.alloc(clusterSize);
    await fh.read(cluster, 0, clusterSize, 0);
    let h: Qcow2Header;
    try {
      h = parseHeader(cluster, (await fh.stat()).size);
    } catch (e) {
      if (e instanceof Qcow2FormatError) throw new ImgError(`Could not open '${filename}': ${e.message}`);
      throw e;
    }
    const headerLength = h.headerLength;

    // header extensions: keep all but the backing format, in their order
    const exts: HeaderExtension[] = readHeaderExtensions(cluster, h).filter((e) => e.type !== EXT_BACKING_FORMAT);
    if (backing !== '' && backingFormat !== undefined) exts.unshift({ type: EXT_BACKING_FORMAT, data: Buffer.from(backingFormat) });

    const out = Buffer.alloc(clusterSize);
    cluster.copy(out, 0, 0, headerLength);
    let w = headerLength;
    for (const e of exts) {
      const padded = Math.ceil(e.data.length / 8) * 8;
      if (w + 8 + padded + 8 > clusterSize) throw new ImgError(`Could not change the backing file to '${backing}': No space left on device`);
      out.writeUInt32BE(e.type, w);
      out.writeUInt32BE(e.data.length, w + 4);
      e.data.copy(out, w + 8);
      w += 8 + padded;
    }
    out.writeUInt32BE(EXT_END, w);
    out.writeUInt32BE(0, w + 4);
    w += 8;
    const name = Buffer.from(backing);
    if (name.length > 1023 || w + name.length > clusterSize) {
      throw new ImgError(`Could not change the backing file to '${backing}': No space left on device`);
    }
    name.copy(out, w);
    // backing_file_offset (u64 at 8) and backing_file_size (u32 at 16)
    out.writeBigUInt64BE(name.length ? BigInt(w) : 0n, 8);
    out.writeUInt32BE(name.length, 16);
    // the first cluster holds only the header (as QEMU lays it out): rewrite all of it
    await fh.write(out, 0, clusterSize, 0);
    await fh.datasync();
    return 0;
  } finally {
    await fh.close();
  }
}
