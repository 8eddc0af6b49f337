// Protocol driver "null-co": discards writes, reads zeroes (read-zeroes=on) or leaves the
// buffer unspecified like QEMU (read-zeroes=off; lockstep still returns zeroes, since a
// Buffer a caller can see is never left uninitialised). Options: size (default 1 GiB),
// read-zeroes.

import { makeCaps, type BlockDriver, type NodeImpl } from '../driver.js';

export const nullDriver: BlockDriver = {
  name: 'null-co',
  kind: 'protocol',
  async open(_ctx, o): Promise<NodeImpl> {
    const size = o.size('size') ?? 1024 ** 3;
    const readZeroes = o.bool('read-zeroes', false);
    o.uint('latency-ns');
    o.done();
    return {
      caps: makeCaps({ writeZeroes: true, discard: true, blockStatus: true }),
      filename: 'null-co://',
      getLength: () => size,
      read: async (_offset, length) => Buffer.alloc(length),
      write: async () => {},
      writeZeroes: async () => {},
      discard: async () => {},
      flush: async () => {},
      blockStatus: async (_offset, length) => ({ length, allocated: true, data: !readZeroes, zero: readZeroes }),
      close: async () => {},
      info: () => ({ 'read-zeroes': readZeroes }),
    };
  },
};
