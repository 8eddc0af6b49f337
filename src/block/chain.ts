// Questions about backing chains: which layer defines a range, and the status of the whole
// view (what qemu-img map and NBD base:allocation report).

import type { BlockNode } from './node.js';

/** Follows filters down to the node whose data they show. */
export function skipFilters(node: BlockNode): BlockNode {
  let n = node;
  while (n.caps.filter && n.file) n = n.file;
  return n;
}

/** The next layer down a COW chain: a filter's file, a format's backing. */
export function nextLayer(node: BlockNode): BlockNode | null {
  if (node.caps.filter) return node.file;
  return node.backing;
}

/**
 * Whether [offset, offset+length) is allocated in any layer from `top` down to, excluding,
 * `base` (null: the whole chain). Returns the longest prefix with the same answer.
 */
export async function isAllocatedAbove(
  top: BlockNode,
  base: BlockNode | null,
  offset: number,
  length: number,
): Promise<{ allocated: boolean; length: number }> {
  const stop = base ? skipFilters(base) : null;
  let n = length;
  let layer: BlockNode | null = skipFilters(top);
  while (layer && layer !== stop) {
    if (offset >= layer.getLength()) {
      layer = nextLayer(layer);
      continue;
    }
    const s = await layer.blockStatus(offset, Math.min(n, layer.getLength() - offset));
    if (s.allocated) return { allocated: true, length: s.length };
    n = Math.min(n, s.length);
    const below = nextLayer(layer);
    layer = below ? skipFilters(below) : null;
  }
  return { allocated: false, length: n };
}

export interface ChainStatus {
  length: number;
  /** some layer above the end of the chain defines the range */
  allocated: boolean;
  data: boolean;
  zero: boolean;
  /** 0 = top */
  depth: number;
  hostOffset?: number;
  file?: BlockNode;
}

/** The status of the view through the whole chain at `offset`. */
export async function chainStatus(top: BlockNode, offset: number, length: number): Promise<ChainStatus> {
  let n = length;
  let depth = 0;
  let layer: BlockNode | null = skipFilters(top);
  while (layer) {
    if (offset >= layer.getLength()) break; // past a shorter backing: reads as zeroes
    const s = await layer.blockStatus(offset, Math.min(n, layer.getLength() - offset));
    n = Math.min(n, s.length);
    const below = nextLayer(layer);
    if (s.allocated || !below) {
      const out: ChainStatus = { length: n, allocated: s.allocated, data: s.data, zero: s.zero, depth };
      if (s.hostOffset !== undefined) out.hostOffset = s.hostOffset;
      if (s.file) out.file = s.file;
      return out;
    }
    layer = skipFilters(below);
    depth++;
  }
  return { length: n, allocated: false, data: false, zero: true, depth };
}
