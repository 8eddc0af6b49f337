// A test-only copy-on-write overlay driver "test-cow": an in-memory image with a backing
// child, cluster-granular allocation, zero clusters and make_empty. It lets job tests build
// backing chains without the qcow2 driver; the qcow2 variants of the tests use real files.
// Options: size (default: the backing's length), backing (BlockdevRef or null),
// cluster-size (default 65536), backing-read-delay-ms (a test knob, default 0).

import { makeCaps, type BlockDriver, type BlockStatus, type NodeImpl } from '../../src/block/driver.js';
import type { BlockNode } from '../../src/block/node.js';
import { BlockGraph } from '../../src/block/graph.js';
import { createRegistry } from '../../src/block/registry.js';

export const cowDriver: BlockDriver = {
  name: 'test-cow',
  kind: 'format',
  supportsBacking: true,
  supportsMakeEmpty: true,
  async open(ctx, o): Promise<NodeImpl> {
    const sizeOpt = o.size('size');
    const cluster = o.uint('cluster-size') ?? 65536;
    const backingOpt = o.raw('backing');
    // test knob: wait this long before reading the backing file (widens race windows)
    const delayMs = o.uint('backing-read-delay-ms') ?? 0;
    o.done();
    const opened: BlockNode | null = await ctx.openChild('backing', backingOpt, { readOnly: true });
    let size = sizeOpt ?? opened?.getLength() ?? 0;
    // the backing edge can be re-pointed (intermediate commit): read it at request time
    const node = ctx.node;
    /** cluster index -> data (a zero cluster is an all-zero buffer) */
    const map = new Map<number, Buffer>();
    const readCluster = async (idx: number): Promise<Buffer> => {
      const backing = node.backing;
      const own = map.get(idx);
      if (own) return Buffer.from(own);
      const off = idx * cluster;
      const n = Math.min(cluster, size - off);
      const out = Buffer.alloc(cluster);
      if (backing && off < backing.getLength()) {
        const m = Math.min(n, backing.getLength() - off);
        if (delayMs > 0) await new Promise((r) => setTimeout(r, delayMs));
        (await backing.read(off, m)).copy(out);
      }
      return out;
    };
    const modify = async (offset: number, length: number, fill: (buf: Buffer, from: number, to: number, pos: number) => void): Promise<void> => {
      for (let pos = offset; pos < offset + length; ) {
        const idx = Math.floor(pos / cluster);
        const inOff = pos - idx * cluster;
        const n = Math.min(cluster - inOff, offset + length - pos);
        const buf = n === cluster ? Buffer.alloc(cluster) : await readCluster(idx);
        fill(buf, inOff, inOff + n, pos);
        map.set(idx, buf);
        pos += n;
      }
    };
    return {
      caps: makeCaps({ writeZeroes: true, discard: true, blockStatus: true, truncate: false }),
      filename: 'test-cow',
      getLength: () => size,
      clusterSize: cluster,
      info: () => ({ 'cluster-size': cluster }),
      async read(offset, length) {
        const out = Buffer.alloc(length);
        for (let pos = offset; pos < offset + length; ) {
          const idx = Math.floor(pos / cluster);
          const inOff = pos - idx * cluster;
          const n = Math.min(cluster - inOff, offset + length - pos);
          (await readCluster(idx)).copy(out, pos - offset, inOff, inOff + n);
          pos += n;
        }
        return out;
      },
      async write(offset, data) {
        await modify(offset, data.length, (buf, from, to, pos) => data.copy(buf, from, pos - offset, pos - offset + (to - from)));
      },
      async writeZeroes(offset, length) {
        await modify(offset, length, (buf, from, to) => buf.fill(0, from, to));
      },
      async discard() {},
      async flush() {},
      async blockStatus(offset, length): Promise<BlockStatus> {
        const first = Math.floor(offset / cluster);
        const alloc = map.has(first);
        const isZero = (b: Buffer | undefined): boolean => !!b && b.every((x) => x === 0);
        const zero = alloc ? isZero(map.get(first)) : node.backing === null;
        let idx = first + 1;
        while (idx * cluster < offset + length && map.has(idx) === alloc && (alloc ? isZero(map.get(idx)) === zero : true)) idx++;
        const n = Math.min(idx * cluster, offset + length) - offset;
        return { length: n, allocated: alloc, zero, data: alloc && !zero };
      },
      async makeEmpty() {
        map.clear();
      },
      async truncate(len) {
        size = len;
      },
      async close() {
        map.clear();
      },
    };
  },
};

/** A graph whose registry also has the test-cow driver. */
export function newCowGraph(): BlockGraph {
  return new BlockGraph(createRegistry([cowDriver]));
}
