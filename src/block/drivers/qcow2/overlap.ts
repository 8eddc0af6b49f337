// Metadata overlap checks: QEMU's `overlap-check=cached` (its default). Before any write into
// the image file, the target range is checked against the metadata the image has in memory:
// the header, the active L1 table, the refcount table, the snapshot table, the snapshots' L1
// tables, every L2 table the active L1 points to and every refcount block the refcount table
// points to (QEMU's `cached` leaves out only the snapshots' L2 tables, which it would have to
// read). A write that would land on metadata other than what it means to change marks the
// image corrupt: the check runs where a table is about to be changed in memory too, so that
// the guest's write fails at once (QEMU: EIO, "Preventing invalid write on metadata
// (overlaps with ...)") rather than a later writeback.

/** What a write may overlap; a write names what it is so that it does not trip on itself. */
export const OL = {
  NONE: 0,
  MAIN_HEADER: 1 << 0,
  ACTIVE_L1: 1 << 1,
  ACTIVE_L2: 1 << 2,
  REFCOUNT_TABLE: 1 << 3,
  REFCOUNT_BLOCK: 1 << 4,
  SNAPSHOT_TABLE: 1 << 5,
  INACTIVE_L1: 1 << 6,
} as const;

/** QEMU's names (metadata_ol_names), used in its message */
export const OL_NAMES: Readonly<Record<number, string>> = {
  [OL.MAIN_HEADER]: 'qcow2_header',
  [OL.ACTIVE_L1]: 'active L1 table',
  [OL.ACTIVE_L2]: 'active L2 table',
  [OL.REFCOUNT_TABLE]: 'refcount table',
  [OL.REFCOUNT_BLOCK]: 'refcount block',
  [OL.SNAPSHOT_TABLE]: 'snapshot table',
  [OL.INACTIVE_L1]: 'inactive L1 table',
};

export interface SnapshotL1 {
  l1Offset: number;
  l1Size: number;
}

/** The metadata an open image knows about (all offsets in bytes). */
export interface MetadataLayout {
  clusterSize: number;
  l1Offset: number;
  l1: readonly number[];
  refcountTableOffset: number;
  refcountTableBytes: number;
  refcountTable: readonly number[];
  /** entries of refcountTable that may be non-zero (the rest are zero); default: all */
  refcountTableUsed?: number;
  snapshotsOffset: number;
  /** bytes of the snapshot table as read at open (0 without snapshots) */
  snapshotsBytes: number;
  snapshots: readonly SnapshotL1[];
}

/**
 * The first kind of metadata (QEMU's order) that [offset, offset+size) overlaps, leaving
 * out the kinds in `ignore`; 0 when none.
 */
export function metadataOverlap(m: MetadataLayout, ignore: number, offset: number, size: number): number {
  if (size <= 0) return 0;
  const cs = m.clusterSize;
  const chk = ~ignore;
  if (chk & OL.MAIN_HEADER && offset < cs) return OL.MAIN_HEADER;
  // whole clusters, as QEMU compares
  const start = Math.floor(offset / cs) * cs;
  const end = Math.ceil((offset + size) / cs) * cs;
  const hits = (o: number, len: number): boolean => len > 0 && o < end && start < o + len;
  if (chk & OL.ACTIVE_L1 && m.l1.length > 0 && hits(m.l1Offset, m.l1.length * 8)) return OL.ACTIVE_L1;
  if (chk & OL.REFCOUNT_TABLE && hits(m.refcountTableOffset, m.refcountTableBytes)) return OL.REFCOUNT_TABLE;
  if (chk & OL.SNAPSHOT_TABLE && hits(m.snapshotsOffset, m.snapshotsBytes)) return OL.SNAPSHOT_TABLE;
  if (chk & OL.INACTIVE_L1) {
    for (const s of m.snapshots) if (hits(s.l1Offset, s.l1Size * 8)) return OL.INACTIVE_L1;
  }
  if (chk & OL.ACTIVE_L2) {
    for (const t of m.l1) if (t !== 0 && hits(t, cs)) return OL.ACTIVE_L2;
  }
  if (chk & OL.REFCOUNT_BLOCK) {
    const rt = m.refcountTable;
    const used = Math.min(rt.length, m.refcountTableUsed ?? rt.length);
    for (let i = 0; i < used; i++) {
      const b = rt[i]!;
      if (b !== 0 && hits(b, cs)) return OL.REFCOUNT_BLOCK;
    }
  }
  return 0;
}

export function overlapMessage(kind: number): string {
  return `Preventing invalid write on metadata (overlaps with ${OL_NAMES[kind] ?? 'metadata'})`;
}
