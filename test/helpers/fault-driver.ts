// A test-only filter whose failures the test switches on and off from code
// (blkdebug's rules are event-driven; these tests need "fail every write from now on").
import { makeCaps, type BlockDriver, type NodeImpl } from '../../src/block/driver.js';
import { BlockError, type ErrorCode } from '../../src/errors.js';
import type { BlockNode } from '../../src/block/node.js';

export interface FaultControl {
  failWrites: ErrorCode | null;
  failReads: ErrorCode | null;
  writes: number;
}

export const faultDriver: BlockDriver = {
  name: 'test-fault',
  kind: 'filter',
  async open(ctx, o): Promise<NodeImpl> {
    const fileOpt = o.raw('file');
    o.done();
    const file = (await ctx.openChild('file', fileOpt, { required: true }))!;
    const control: FaultControl = { failWrites: null, failReads: null, writes: 0 };
    const impl: NodeImpl & { control: FaultControl } = {
      control,
      caps: makeCaps({
        filter: true,
        writeZeroes: true,
        discard: true,
        truncate: file.caps.truncate,
        requestAlignment: file.caps.requestAlignment,
        growable: file.caps.growable ?? false,
      }),
      truncate: (length) => file.truncate(length),
      get filename() {
        return file.filename;
      },
      getLength: () => file.getLength(),
      read: async (offset, length) => {
        if (control.failReads) throw new BlockError(control.failReads);
        return file.read(offset, length);
      },
      write: async (offset, data, flags) => {
        control.writes++;
        if (control.failWrites) throw new BlockError(control.failWrites);
        return file.write(offset, data, flags);
      },
      writeZeroes: async (offset, length, flags) => {
        control.writes++;
        if (control.failWrites) throw new BlockError(control.failWrites);
        return file.writeZeroes(offset, length, flags);
      },
      discard: (offset, length) => file.discard(offset, length),
      flush: () => file.flush(),
      close: async () => {},
    };
    return impl;
  },
};

export function faultControl(node: BlockNode): FaultControl {
  return (node.impl as NodeImpl & { control: FaultControl }).control;
}
