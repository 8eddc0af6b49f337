// qcow2 header and header extensions: parse and serialise (docs/interop/qcow2.txt).
// The serialiser lays the first cluster out the way QEMU 7.2 does: fixed header (72 bytes
// for v2, 112 for v3 plus any unknown trailing fields kept from the file), then the
// extensions (backing format, feature name table for v3, every unknown extension in file
// order), the end marker, and the backing file name.

import { InvalidArgumentError } from '../../../errors.js';
import type { HostFile } from './host-file.js';

export const QCOW2_MAGIC = 0x514649fb;
export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;
export const AUTOCLEAR_BITMAPS = 1n << 0n;
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;

/** the feature name table QEMU 7.2 writes, in its order */
const FEATURE_TABLE: ReadonlyArray<readonly [number, number, string]> = [
  [0, 0, 'dirty bit'],
  [0, 1, 'corrupt bit'],
  [0, 2, 'external data file'],
  [0, 3, 'compression type'],
  [0, 4, 'extended L2 entries'],
  [1, 0, 'lazy refcounts'],
  [2, 0, 'bitmaps'],
  [2, 1, 'raw external data'],
];

const V3_HEADER_LENGTH = 112;
const V2_HEADER_LENGTH = 72;

export interface HeaderExtension {
  type: number;
  data: Buffer;
}

export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatible: bigint;
  compatible: bigint;
  autoclear: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  /** header bytes past the fields we know (kept on rewrite) */
  unknownHeaderFields: Buffer;
  backingFile: string | null;
  backingFormat: string | null;
  /** feature names from the image's own table, for error messages */
  featureNames: Map<string, string>;
  /** extensions we do not interpret, preserved on rewrite */
  unknownExtensions: HeaderExtension[];
  /** the bitmaps extension is kept as it is (its autoclear bit is cleared on write) */
  hasBitmapsExtension: boolean;
  hasDataFileExtension: boolean;
  hasCryptoExtension: boolean;
}

/** A structural problem of the image: names what is wrong. */
export class Qcow2FormatError extends InvalidArgumentError {
  override name = 'Qcow2FormatError';
}

function u64(buf: Buffer, off: number, what: string): number {
  const v = buf.readBigUInt64BE(off);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new Qcow2FormatError(`qcow2 header field ${what} is too large (${v})`);
  return Number(v);
}

/**
 * Parses the header from the first bytes of the image (at least the first cluster, or the
 * whole file when shorter). Checks what can be checked without the rest of the file.
 */
export function parseHeader(buf: Buffer, fileLength: number): Qcow2Header {
  if (buf.length < V2_HEADER_LENGTH) {
    throw new Qcow2FormatError(`Image is not in qcow2 format: truncated header (${buf.length} of ${V2_HEADER_LENGTH} bytes)`);
  }
  if (buf.readUInt32BE(0) !== QCOW2_MAGIC) throw new Qcow2FormatError('Image is not in qcow2 format (bad magic)');
  const version = buf.readUInt32BE(4);
  if (version !== 2 && version !== 3) throw new Qcow2FormatError(`Unsupported qcow2 version ${version}`);
  const clusterBits = buf.readUInt32BE(20);
  if (clusterBits < 9 || clusterBits > 21) {
    throw new Qcow2FormatError(`Unsupported cluster size: 2^${clusterBits} (must be 512 bytes to 2 MiB)`);
  }
  const clusterSize = 2 ** clusterBits;
  const h: Qcow2Header = {
    version,
    backingFileOffset: u64(buf, 8, 'backing_file_offset'),
    backingFileSize: buf.readUInt32BE(16),
    clusterBits,
    size: u64(buf, 24, 'size'),
    cryptMethod: buf.readUInt32BE(32),
    l1Size: buf.readUInt32BE(36),
    l1TableOffset: u64(buf, 40, 'l1_table_offset'),
    refcountTableOffset: u64(buf, 48, 'refcount_table_offset'),
    refcountTableClusters: buf.readUInt32BE(56),
    nbSnapshots: buf.readUInt32BE(60),
    snapshotsOffset: u64(buf, 64, 'snapshots_offset'),
    incompatible: 0n,
    compatible: 0n,
    autoclear: 0n,
    refcountOrder: 4,
    headerLength: V2_HEADER_LENGTH,
    compressionType: 0,
    unknownHeaderFields: Buffer.alloc(0),
    backingFile: null,
    backingFormat: null,
    featureNames: new Map(),
    unknownExtensions: [],
    hasBitmapsExtension: false,
    hasDataFileExtension: false,
    hasCryptoExtension: false,
  };
  if (version === 3) {
    if (buf.length < 104) throw new Qcow2FormatError(`Image is not in qcow2 format: truncated header (${buf.length} of 104 bytes)`);
    h.incompatible = buf.readBigUInt64BE(72);
    h.compatible = buf.readBigUInt64BE(80);
    h.autoclear = buf.readBigUInt64BE(88);
    h.refcountOrder = buf.readUInt32BE(96);
    h.headerLength = buf.readUInt32BE(100);
    if (h.headerLength < 104 || h.headerLength % 8 !== 0) {
      throw new Qcow2FormatError(`qcow2 header length ${h.headerLength} is invalid (at least 104, a multiple of 8)`);
    }
    if (h.headerLength > clusterSize || h.headerLength > buf.length) {
      throw new Qcow2FormatError(`qcow2 header exceeds cluster size or file (header length ${h.headerLength})`);
    }
    if (h.headerLength > 104) h.compressionType = buf[104]!;
    if (h.headerLength > V3_HEADER_LENGTH) h.unknownHeaderFields = Buffer.from(buf.subarray(V3_HEADER_LENGTH, h.headerLength));
  }
  if (h.refcountOrder > 6) throw new Qcow2FormatError(`Reference count entry width too large; may not exceed 64 bits (refcount_order ${h.refcountOrder})`);
  if (h.size % 512 !== 0) throw new Qcow2FormatError(`qcow2 virtual size ${h.size} is not a multiple of 512`);
  for (const [what, off] of [
    ['L1 table', h.l1TableOffset],
    ['refcount table', h.refcountTableOffset],
    ['snapshot table', h.snapshotsOffset],
  ] as const) {
    if (off % clusterSize !== 0) throw new Qcow2FormatError(`Invalid qcow2 image: ${what} offset ${off} is not cluster aligned`);
  }
  if (h.refcountTableClusters === 0) throw new Qcow2FormatError('Invalid qcow2 image: refcount table has no clusters');
  if (h.refcountTableOffset === 0) throw new Qcow2FormatError('Invalid qcow2 image: refcount table offset is 0 (overlaps the header)');

  for (const { type, data } of readHeaderExtensions(buf, h)) {
    switch (type) {
      case EXT_BACKING_FORMAT:
        h.backingFormat = data.toString('latin1');
        break;
      case EXT_FEATURE_TABLE:
        for (let i = 0; i + 48 <= data.length; i += 48) {
          const name = data.subarray(i + 2, i + 48);
          const z = name.indexOf(0);
          h.featureNames.set(`${data[i]}:${data[i + 1]}`, name.subarray(0, z < 0 ? 46 : z).toString('latin1'));
        }
        break;
      case EXT_BITMAPS:
        h.hasBitmapsExtension = true;
        h.unknownExtensions.push({ type, data });
        break;
      case EXT_DATA_FILE:
        h.hasDataFileExtension = true;
        h.unknownExtensions.push({ type, data });
        break;
      case EXT_CRYPTO:
        h.hasCryptoExtension = true;
        h.unknownExtensions.push({ type, data });
        break;
      default:
        h.unknownExtensions.push({ type, data });
    }
  }

  if (h.backingFileOffset > 0) {
    if (h.backingFileSize > 1023 || h.backingFileSize === 0) {
      throw new Qcow2FormatError(`Backing file name too long or empty (${h.backingFileSize} bytes)`);
    }
    if (h.backingFileOffset + h.backingFileSize > Math.min(clusterSize, buf.length)) {
      throw new Qcow2FormatError('Invalid qcow2 image: backing file name lies outside the first cluster');
    }
    h.backingFile = buf.subarray(h.backingFileOffset, h.backingFileOffset + h.backingFileSize).toString('utf8');
  }
  if (fileLength < Math.min(clusterSize, V2_HEADER_LENGTH)) throw new Qcow2FormatError('Image is not in qcow2 format: truncated header');
  return h;
}

/**
 * The header extensions of the header cluster in `buf`, in file order, as they are (copies):
 * from the end of the fixed header (`h.headerLength`) to the end marker, the backing file
 * name or the end of the cluster. Old images put the backing file name right after the
 * fixed header without an end marker: no room for another extension header ends the list.
 */
export function readHeaderExtensions(buf: Buffer, h: Pick<Qcow2Header, 'headerLength' | 'backingFileOffset' | 'clusterBits'>): HeaderExtension[] {
  const clusterSize = 2 ** h.clusterBits;
  const end = Math.min(buf.length, h.backingFileOffset > 0 ? h.backingFileOffset : clusterSize, clusterSize);
  const out: HeaderExtension[] = [];
  for (let off = h.headerLength; off + 8 <= end; ) {
    const type = buf.readUInt32BE(off);
    const len = buf.readUInt32BE(off + 4);
    off += 8;
    if (type === EXT_END) break;
    if (off + len > end) throw new Qcow2FormatError(`Invalid qcow2 image: header extension 0x${type.toString(16)} overruns the header area`);
    out.push({ type, data: Buffer.from(buf.subarray(off, off + len)) });
    off += (len + 7) & ~7;
  }
  return out;
}

function pad8(n: number): number {
  return (n + 7) & ~7;
}

/** Names set incompatible bits using the image's feature table where it has one. */
export function describeIncompatible(h: Qcow2Header, bits: bigint): string {
  const names: string[] = [];
  for (let i = 0n; i < 64n; i++) {
    if (!(bits & (1n << i))) continue;
    names.push(h.featureNames.get(`0:${i}`) ?? `Unknown incompatible feature: bit ${i}`);
  }
  return names.join(', ');
}

/**
 * Serialises the header cluster content (header, extensions, backing file name). Throws
 * when it does not fit into one cluster.
 */
export function serializeHeader(h: Qcow2Header): Buffer {
  const clusterSize = 2 ** h.clusterBits;
  const headerLength = h.version === 2 ? V2_HEADER_LENGTH : V3_HEADER_LENGTH + h.unknownHeaderFields.length;
  const exts: HeaderExtension[] = [];
  if (h.backingFormat !== null && h.backingFile !== null) {
    exts.push({ type: EXT_BACKING_FORMAT, data: Buffer.from(h.backingFormat, 'latin1') });
  }
  // QEMU 7.2 leaves the feature name table out when clusters are 4 KiB or smaller
  if (h.version === 3 && clusterSize > 4096) {
    const t = Buffer.alloc(48 * FEATURE_TABLE.length);
    FEATURE_TABLE.forEach(([type, bit, name], i) => {
      t[i * 48] = type;
      t[i * 48 + 1] = bit;
      t.write(name, i * 48 + 2, 'latin1');
    });
    exts.push({ type: EXT_FEATURE_TABLE, data: t });
  }
  exts.push(...h.unknownExtensions);
  let extLen = 8;
  for (const e of exts) extLen += 8 + pad8(e.data.length);
  const backing = h.backingFile !== null ? Buffer.from(h.backingFile, 'utf8') : null;
  const total = headerLength + extLen + (backing?.length ?? 0);
  if (total > clusterSize) throw new InvalidArgumentError('qcow2 header and extensions do not fit into the first cluster');
  const buf = Buffer.alloc(total);
  buf.writeUInt32BE(QCOW2_MAGIC, 0);
  buf.writeUInt32BE(h.version, 4);
  const backingOffset = backing ? headerLength + extLen : 0;
  buf.writeBigUInt64BE(BigInt(backingOffset), 8);
  buf.writeUInt32BE(backing?.length ?? 0, 16);
  buf.writeUInt32BE(h.clusterBits, 20);
  buf.writeBigUInt64BE(BigInt(h.size), 24);
  buf.writeUInt32BE(h.cryptMethod, 32);
  buf.writeUInt32BE(h.l1Size, 36);
  buf.writeBigUInt64BE(BigInt(h.l1TableOffset), 40);
  buf.writeBigUInt64BE(BigInt(h.refcountTableOffset), 48);
  buf.writeUInt32BE(h.refcountTableClusters, 56);
  buf.writeUInt32BE(h.nbSnapshots, 60);
  buf.writeBigUInt64BE(BigInt(h.snapshotsOffset), 64);
  if (h.version === 3) {
    buf.writeBigUInt64BE(h.incompatible, 72);
    buf.writeBigUInt64BE(h.compatible, 80);
    buf.writeBigUInt64BE(h.autoclear, 88);
    buf.writeUInt32BE(h.refcountOrder, 96);
    buf.writeUInt32BE(headerLength, 100);
    buf[104] = h.compressionType;
    h.unknownHeaderFields.copy(buf, V3_HEADER_LENGTH);
  }
  let off = headerLength;
  for (const e of exts) {
    buf.writeUInt32BE(e.type, off);
    buf.writeUInt32BE(e.data.length, off + 4);
    e.data.copy(buf, off + 8);
    off += 8 + pad8(e.data.length);
  }
  off += 8; // end marker (zeroes)
  if (backing) backing.copy(buf, off);
  return buf;
}

/** A v2/v3 header for a new image (create.ts); tables are filled in by the caller. */
export function newHeader(opts: {
  version: 2 | 3;
  clusterBits: number;
  size: number;
  refcountOrder: number;
  lazyRefcounts: boolean;
}): Qcow2Header {
  return {
    version: opts.version,
    backingFileOffset: 0,
    backingFileSize: 0,
    clusterBits: opts.clusterBits,
    size: opts.size,
    cryptMethod: 0,
    l1Size: 0,
    l1TableOffset: 0,
    refcountTableOffset: 2 ** opts.clusterBits,
    refcountTableClusters: 1,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatible: 0n,
    compatible: opts.lazyRefcounts ? COMPAT_LAZY_REFCOUNTS : 0n,
    autoclear: 0n,
    refcountOrder: opts.refcountOrder,
    headerLength: opts.version === 2 ? V2_HEADER_LENGTH : V3_HEADER_LENGTH,
    compressionType: 0,
    unknownHeaderFields: Buffer.alloc(0),
    backingFile: null,
    backingFormat: null,
    featureNames: new Map(),
    unknownExtensions: [],
    hasBitmapsExtension: false,
    hasDataFileExtension: false,
    hasCryptoExtension: false,
  };
}

const KNOWN_INCOMPAT = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

/** Reads and parses the header cluster of `file`. */
export async function readHeader(file: HostFile): Promise<Qcow2Header> {
  const len = file.length();
  let buf = await file.read(0, Math.min(len, 65536));
  if (buf.length >= 24 && buf.readUInt32BE(0) === QCOW2_MAGIC) {
    const bits = buf.readUInt32BE(20);
    if (bits > 16 && bits <= 21) buf = await file.read(0, Math.min(len, 2 ** bits));
  }
  return parseHeader(buf, len);
}

/** Refuses what lockstep cannot handle, naming the feature. */
export function checkSupported(h: Qcow2Header, readOnly: boolean, filename: string): void {
  const unsupported = (what: string): never => {
    throw new InvalidArgumentError(`'${filename}' uses a qcow2 feature lockstep does not support: ${what}`);
  };
  if (h.cryptMethod !== 0) unsupported(h.cryptMethod === 1 ? 'AES encryption' : h.cryptMethod === 2 ? 'LUKS encryption' : `encryption method ${h.cryptMethod}`);
  if (h.incompatible & INCOMPAT_DATA_FILE) unsupported('external data file');
  if (h.incompatible & INCOMPAT_EXTL2) unsupported('extended L2 entries');
  if (h.incompatible & INCOMPAT_COMPRESSION && h.compressionType !== 0) unsupported(`compression type ${h.compressionType === 1 ? 'zstd' : h.compressionType}`);
  const unknown = h.incompatible & ~KNOWN_INCOMPAT;
  if (unknown) unsupported(describeIncompatible(h, unknown));
  if (h.incompatible & INCOMPAT_CORRUPT && !readOnly) {
    throw new InvalidArgumentError('qcow2: Image is corrupt; cannot be opened read/write');
  }
}

