// Filter drivers "mirror_top" and "commit_top": the implicit nodes that mirror and active
// commit insert above their source (QEMU's names). They pass every request to `file` and,
// once a job attached a bitmap, mark each written range dirty after the write finished
// (so that a copy that read the old data is repeated), then wake the job.
//
// At a job's pivot the node is dropped from the graph while writers may be queued on its
// request tracker; `redirect` then sends those late requests to the node that replaced
// the source, so no write lands on the old source after the switch.
//
// Option: file (BlockdevRef). Only jobs create these nodes.

import { commitTopChildPerms, filterChildPerms } from '../permissions.js';
import { makeCaps, type BlockDriver, type NodeImpl } from '../driver.js';
import { StateError } from '../../errors.js';
import type { BlockNode } from '../node.js';
import type { Bitmap } from '../../util/bitmap.js';

export class JobTopState {
  bitmap: Bitmap | null = null;
  onDirty: (() => void) | null = null;
  redirect: BlockNode | null = null;

  constructor(readonly file: BlockNode) {}

  /** where requests go now */
  get dest(): BlockNode {
    return this.redirect ?? this.file;
  }

  async modify(offset: number, length: number, op: (n: BlockNode) => Promise<void>): Promise<void> {
    const dest = this.dest;
    try {
      await op(dest);
    } finally {
      // marked even on failure: the range may have changed partly
      if (dest === this.file && this.bitmap && length > 0) {
        this.bitmap.setRange(offset, length);
        this.onDirty?.();
      }
    }
  }
}

export interface JobTopImpl extends NodeImpl {
  readonly top: JobTopState;
}

export function getJobTop(node: BlockNode): JobTopState {
  if (node.driver !== mirrorTopDriver && node.driver !== commitTopDriver) {
    throw new StateError(`Node '${node.name}' is not a job filter`);
  }
  return (node.impl as JobTopImpl).top;
}

function makeDriver(name: string): BlockDriver {
  return {
    name,
    kind: 'filter',
    // mirror_top passes its parents' needs through; commit_top neither reads consistently
    // nor keeps others from writing (the chain above the base is inconsistent meanwhile)
    childPerms: (_node, _role, parent) => (name === 'commit_top' ? commitTopChildPerms(parent) : filterChildPerms(parent)),
    async open(ctx, o): Promise<NodeImpl> {
      const fileOpt = o.raw('file');
      o.done();
      const file = (await ctx.openChild('file', fileOpt, { required: true }))!;
      const top = new JobTopState(file);
      const impl: JobTopImpl = {
        top,
        caps: makeCaps({ requestAlignment: 1, fua: true, writeZeroes: true, discard: true, filter: true, growable: file.caps.growable ?? false }),
        get filename() {
          return file.filename;
        },
        getLength: () => file.getLength(),
        read: (offset, length) => top.dest.read(offset, length),
        readInto: (offset, buf) => top.dest.readInto(offset, buf),
        write: (offset, data, flags) => top.modify(offset, data.length, (n) => n.write(offset, data, flags)),
        writeZeroes: (offset, length, flags) => top.modify(offset, length, (n) => n.writeZeroes(offset, length, flags)),
        discard: (offset, length) => top.modify(offset, length, (n) => n.discard(offset, length)),
        flush: () => top.dest.flush(),
        close: async () => {},
      };
      return impl;
    },
  };
}

export const mirrorTopDriver = makeDriver('mirror_top');
export const commitTopDriver = makeDriver('commit_top');
