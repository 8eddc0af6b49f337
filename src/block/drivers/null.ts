// Protocol driver "null-co": discards writes, reads zeroes (read-zeroes=on) or leaves the
// buffer unspecified like QEMU (read-zeroes=off; lockstep still returns zeroes, since a
// Buffer a caller can see is never left uninitialised). Options: size (default 1 GiB),
// read-zeroes.

import { makeCaps, type BlockDriver, type NodeImpl } from '../driver.js';
import { InvalidArgumentError } from '../../errors.js';

export const nullDriver: BlockDriver = {
  name: 'null-co',
  kind: 'protocol',
  async open(_ctx, o): Promise<NodeImpl> {
    const size = o.intSize('size') ?? 1024 ** 3;
    // QEMU's BDRV_MAX_LENGTH (INT64_MAX aligned down to 1 GiB): nothing larger can be a disk,
    // and an NBD export of it would advertise a negative size
    if (size > 2 ** 63 - 2 ** 30) throw new InvalidArgumentError('Could not refresh total sector count: File too large');
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
