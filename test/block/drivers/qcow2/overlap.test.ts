// The metadata overlap checks scan the refcount table only as far as it can hold blocks
// (QEMU's max_refcount_table_index): the bound must cover every refcount block the image
// has, including those allocated while it is open, or a write onto one would slip through.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { tempDir } from '../../../helpers/graph.js';
import { createQcow2 } from '../../../../src/block/drivers/qcow2/create.js';
import { FsHostFile } from '../../../../src/block/drivers/qcow2/host-file.js';
import { readHeader } from '../../../../src/block/drivers/qcow2/header.js';
import { Qcow2Image } from '../../../../src/block/drivers/qcow2/image.js';
import { writeRange } from '../../../../src/block/drivers/qcow2/io.js';
import { OL, metadataOverlap, type MetadataLayout } from '../../../../src/block/drivers/qcow2/overlap.js';

const cs = 0x10000;
function layout(refcountTable: number[], refcountTableUsed?: number): MetadataLayout {
  return {
    clusterSize: cs,
    l1Offset: 0x30000,
    l1: [0x40000],
    refcountTableOffset: cs,
    refcountTableBytes: cs,
    refcountTable,
    ...(refcountTableUsed !== undefined ? { refcountTableUsed } : {}),
    snapshotsOffset: 0,
    snapshotsBytes: 0,
    snapshots: [],
  };
}

test('a write onto a refcount block is caught within the used part of the table, as over all of it', () => {
  const table = new Array<number>(8192).fill(0);
  table[0] = 0x20000;
  table[5] = 0x900000;
  for (const used of [undefined, 6, 8192]) {
    assert.equal(metadataOverlap(layout(table, used), OL.NONE, 0x900000 + 512, 4096), OL.REFCOUNT_BLOCK, `used ${used}`);
    assert.equal(metadataOverlap(layout(table, used), OL.NONE, 0x20000, cs), OL.REFCOUNT_BLOCK, `used ${used}`);
    assert.equal(metadataOverlap(layout(table, used), OL.NONE, 0x500000, cs), 0, `used ${used}`);
  }
});

test('refcount blocks allocated while the image is open stay inside the scanned part, and writes onto them fail', async (t) => {
  const dir = tempDir(t);
  const p = join(dir, 'small-clusters.qcow2');
  // 512-byte clusters and 16-bit refcounts: one refcount block per 128 KiB of file, so
  // writing 2 MiB allocates blocks at table indexes the image did not have when opened
  await createQcow2(p, { size: 8 * 1024 * 1024, clusterSize: 512, refcountBits: 16 });
  const file = await FsHostFile.open(p, true);
  t.after(() => file.close());
  const img = new Qcow2Image(file, await readHeader(file), { readOnly: false });
  await img.load();
  const before = img.refcounts.usedEntries();
  for (let off = 0; off < 2 * 1024 * 1024; off += 64 * 1024) await writeRange(img, off, Buffer.alloc(64 * 1024, 0x5a));
  const table = img.refcounts.table;
  let last = table.length - 1;
  while (last >= 0 && table[last] === 0) last--;
  assert.ok(last + 1 > before, `blocks were added (${before} -> ${last + 1} used entries)`);
  assert.ok(img.refcounts.usedEntries() >= last + 1, 'every block lies in the scanned part of the table');
  // the newest block is metadata: a data write onto it marks the image corrupt and fails
  assert.throws(() => img.checkOverlap(OL.NONE, table[last]!, 512), /overlaps with refcount block/);
});
