// L1/L2 entry encoding (docs/interop/qcow2.txt, "Cluster mapping").

export const L2_COPIED_HI = 0x80000000; // bit 63: refcount is exactly one
export const L2_COMPRESSED_HI = 0x40000000; // bit 62
export const L2_ZERO_LO = 1; // bit 0 (v3)

export const enum ClusterKind {
  Unallocated,
  Zero,
  Normal,
  Compressed,
}

export interface L2Entry {
  kind: ClusterKind;
  /** host offset of a normal cluster (may be non-zero for a preallocated zero cluster) */
  offset: number;
  copied: boolean;
}

/** Reads entry i of an L2 table. */
export function readL2(table: Buffer, i: number, v3: boolean): L2Entry {
  const hi = table.readUInt32BE(i * 8);
  const lo = table.readUInt32BE(i * 8 + 4);
  if (hi & L2_COMPRESSED_HI) return { kind: ClusterKind.Compressed, offset: 0, copied: false };
  // >>> 0: a bitwise AND is signed in JS, and a host offset with bit 31 set (a file past
  // 2 GiB) would come out negative
  const offset = (hi & 0x00ffffff) * 0x100000000 + ((lo & 0xfffffe00) >>> 0);
  const copied = (hi & L2_COPIED_HI) !== 0;
  if (v3 && lo & L2_ZERO_LO) return { kind: ClusterKind.Zero, offset, copied };
  if (offset === 0) return { kind: ClusterKind.Unallocated, offset: 0, copied };
  return { kind: ClusterKind.Normal, offset, copied };
}

export function writeL2Normal(table: Buffer, i: number, hostOffset: number): void {
  table.writeUInt32BE((L2_COPIED_HI | Math.floor(hostOffset / 0x100000000)) >>> 0, i * 8);
  table.writeUInt32BE(hostOffset % 0x100000000, i * 8 + 4);
}

export function writeL2Zero(table: Buffer, i: number): void {
  table.writeUInt32BE(0, i * 8);
  table.writeUInt32BE(L2_ZERO_LO, i * 8 + 4);
}

export function writeL2Unallocated(table: Buffer, i: number): void {
  table.writeUInt32BE(0, i * 8);
  table.writeUInt32BE(0, i * 8 + 4);
}

/** The compressed cluster descriptor of entry i: host byte offset and stored length. */
export function readCompressed(table: Buffer, i: number, clusterBits: number): { offset: number; length: number } {
  const v = table.readBigUInt64BE(i * 8) & ((1n << 62n) - 1n);
  const x = BigInt(62 - (clusterBits - 8));
  const offset = Number(v & ((1n << x) - 1n));
  const sectors = Number(v >> x) + 1;
  return { offset, length: sectors * 512 - (offset % 512) };
}

/** Host clusters a compressed cluster's bytes touch (each holds one reference). */
export function compressedClusters(c: { offset: number; length: number }, clusterSize: number): { first: number; count: number } {
  const first = Math.floor(c.offset / clusterSize);
  const last = Math.floor((c.offset + c.length - 1) / clusterSize);
  return { first, count: last - first + 1 };
}

export const L1_OFFSET_MASK_HI = 0x00ffffff;

export function decodeL1(hi: number, lo: number): { offset: number; copied: boolean } {
  return { offset: (hi & L1_OFFSET_MASK_HI) * 0x100000000 + ((lo & 0xfffffe00) >>> 0), copied: (hi & L2_COPIED_HI) !== 0 };
}

export function encodeL1(buf: Buffer, i: number, offset: number, copied: boolean): void {
  const hi = Math.floor(offset / 0x100000000) | (copied && offset !== 0 ? L2_COPIED_HI : 0);
  buf.writeUInt32BE(hi >>> 0, i * 8);
  buf.writeUInt32BE(offset % 0x100000000, i * 8 + 4);
}
