// Format driver "raw": the guest sees `file` directly, optionally a window of it
// (offset/size). Every byte is allocated in this layer; holes and zeroes come from `file`.

import { filterChildPerms, rawWindowChildPerms } from '../permissions.js';
import { makeCaps, type BlockDriver, type NodeImpl } from '../driver.js';
import { BlockError, InvalidArgumentError } from '../../errors.js';

export const rawDriver: BlockDriver = {
  name: 'raw',
  kind: 'format',
  // QEMU's raw: a filter of its file, unless it shows a window of it (offset or size)
  childPerms(node, _role, parent) {
    const o = node.options;
    const window = (o.offset !== undefined && Number(o.offset) !== 0) || o.size !== undefined;
    return window ? rawWindowChildPerms(parent) : filterChildPerms(parent);
  },
  async open(ctx, o): Promise<NodeImpl> {
    const base = o.size('offset') ?? 0;
    const fixedSize = o.size('size');
    const fileOpt = o.raw('file');
    o.done();
    const file = (await ctx.openChild('file', fileOpt, { required: true }))!;
    const fileLen = file.getLength();
    if (base > fileLen) throw new InvalidArgumentError(`The sum of offset (${base}) and size (0) has to be smaller or equal to the  actual size of the containing file (${fileLen})`);
    if (fixedSize !== undefined && base + fixedSize > fileLen) {
      throw new InvalidArgumentError(
        `The sum of offset (${base}) and size (${fixedSize}) has to be smaller or equal to the  actual size of the containing file (${fileLen})`,
      );
    }
    const fc = file.caps;
    const length = (): number => fixedSize ?? file.getLength() - base;
    return {
      caps: makeCaps({
        requestAlignment: fc.requestAlignment,
        maxTransfer: fc.maxTransfer,
        fua: true,
        writeZeroes: true,
        discard: true,
        blockStatus: true,
        truncate: fixedSize === undefined && base === 0,
      }),
      get filename() {
        return file.filename;
      },
      getLength: length,
      read: (offset, len) => file.read(base + offset, len),
      readInto: (offset, buf) => file.readInto(base + offset, buf),
      write: (offset, data, flags) => file.write(base + offset, data, flags),
      writeZeroes: (offset, len, flags) => file.writeZeroes(base + offset, len, flags),
      discard: (offset, len) => file.discard(base + offset, len),
      flush: () => file.flush(),
      blockStatus: async (offset, len) => {
        const s = await file.blockStatus(base + offset, len);
        return { length: Math.min(s.length, len), allocated: true, data: s.data, zero: s.zero, hostOffset: base + offset, file };
      },
      truncate: async (len) => {
        if (fixedSize !== undefined || base !== 0) throw new BlockError('ENOTSUP', 'raw with offset/size cannot be resized');
        await file.truncate(len);
      },
      close: async () => {},
    };
  },
};
