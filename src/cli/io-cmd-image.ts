// qemu-io's image commands: flush, length, info, map, alloc, truncate, sleep.

import { errorMessage } from '../errors.js';
import { humanSize } from './io-format.js';
import { parseIoNumber } from './io-parse.js';
import { errnoText, usageLine, type CommandDef } from './io-cmd-common.js';

export const flushCmd: CommandDef = {
  name: 'flush',
  altname: 'f',
  optstring: '',
  argmin: 0,
  argmax: 0,
  args: '',
  oneline: 'flush all in-core file state to disk',
  async run(ctx) {
    try {
      await ctx.backend.flush();
      return true;
    } catch (e) {
      ctx.err(`${ctx.errorPrefix}flush failed: ${errnoText(e)}\n`);
      return false;
    }
  },
};

export const lengthCmd: CommandDef = {
  name: 'length',
  altname: 'l',
  optstring: '',
  argmin: 0,
  argmax: 0,
  args: '',
  oneline: 'gets the length of the current file',
  async run(ctx) {
    ctx.out(`${humanSize(ctx.backend.getLength())}\n`);
    return true;
  },
};

/** Format-specific fields qemu prints for qcow2, in its order. */
const QCOW2_SPECIFIC = ['compat', 'compression-type', 'lazy-refcounts', 'refcount-bits', 'corrupt', 'extended-l2'];

export const infoCmd: CommandDef = {
  name: 'info',
  altname: 'i',
  optstring: '',
  argmin: 0,
  argmax: 0,
  args: '',
  oneline: 'prints information about the current file',
  async run(ctx) {
    const node = ctx.backend.node;
    const info = node.impl.info?.() ?? {};
    const clusterSize = typeof info['cluster-size'] === 'number' ? info['cluster-size'] : 0;
    let vmStateOffset = 0;
    if (node.driver.name === 'qcow2' && clusterSize > 0) {
      // the VM state lives after the last guest cluster an L1 entry can map
      const perL1Entry = clusterSize * (clusterSize / 8);
      vmStateOffset = Math.ceil(node.getLength() / perL1Entry) * perL1Entry;
    }
    ctx.out(`format name: ${node.driver.name}\n`);
    ctx.out(`cluster size: ${humanSize(clusterSize)}\n`);
    ctx.out(`vm state offset: ${humanSize(vmStateOffset)}\n`);
    if (node.driver.name === 'qcow2') {
      const lines = QCOW2_SPECIFIC.filter((k) => info[k] !== undefined).map((k) => `    ${k.replace(/-/g, ' ')}: ${String(info[k])}\n`);
      if (lines.length) ctx.out('Format specific information:\n' + lines.join(''));
    }
    return true;
  },
};

function allocLine(allocated: boolean, length: number, offset: number): string {
  const state = allocated ? '    allocated' : 'not allocated';
  return `${humanSize(length)} (0x${length.toString(16)}) bytes ${state} at offset ${humanSize(offset)} (0x${offset.toString(16)})\n`;
}

export const mapCmd: CommandDef = {
  name: 'map',
  optstring: '',
  argmin: 0,
  argmax: 0,
  args: '',
  oneline: 'prints the allocated areas of a file',
  async run(ctx) {
    const node = ctx.backend.node;
    const total = node.getLength();
    let offset = 0;
    try {
      while (offset < total) {
        // one line per run of equal allocation state
        const first = await node.blockStatus(offset, total - offset);
        let runLength = first.length;
        while (offset + runLength < total) {
          const next = await node.blockStatus(offset + runLength, total - offset - runLength);
          if (next.allocated !== first.allocated) break;
          runLength += next.length;
        }
        ctx.out(allocLine(first.allocated, runLength, offset));
        offset += runLength;
      }
    } catch (e) {
      ctx.err(`${ctx.errorPrefix}Failed to get allocation status: ${errnoText(e)}\n`);
      return false;
    }
    return true;
  },
};

export const allocCmd: CommandDef = {
  name: 'alloc',
  optstring: '',
  argmin: 1,
  argmax: 2,
  args: 'offset [count]',
  oneline: 'checks if offset is allocated in the file',
  async run(ctx, _opts, args) {
    let offset: number;
    let count = 512;
    try {
      offset = parseIoNumber(args[0]!);
      if (args[1] !== undefined) count = parseIoNumber(args[1]);
    } catch (e) {
      ctx.out(`${(e as Error).message}\n`);
      return false;
    }
    const node = ctx.backend.node;
    // like qemu-io, a range past the end is clipped to the image
    count = Math.max(0, Math.min(count, node.getLength() - offset));
    let allocated = 0;
    try {
      for (let pos = offset; pos < offset + count; ) {
        const s = await node.blockStatus(pos, offset + count - pos);
        if (s.allocated) allocated += s.length;
        pos += s.length;
      }
    } catch (e) {
      ctx.out(`is_allocated failed: ${errnoText(e)}\n`);
      return false;
    }
    ctx.out(`${allocated}/${count} bytes allocated at offset ${humanSize(offset)}\n`);
    return true;
  },
};

const PREALLOC_MODES = ['off', 'metadata', 'falloc', 'full'];

export const truncateCmd: CommandDef = {
  name: 'truncate',
  altname: 't',
  optstring: 'm:',
  argmin: 1,
  argmax: 3,
  writes: true,
  args: '[-m prealloc_mode] off',
  oneline: 'truncates the current file at the given offset',
  async run(ctx, opts, args) {
    const mode = opts.get('m') ?? 'off';
    if (args.length !== 1) {
      ctx.out(usageLine(this));
      return false;
    }
    if (!PREALLOC_MODES.includes(mode)) {
      ctx.err(`${ctx.errorPrefix}Invalid preallocation mode '${mode}'\n`);
      return false;
    }
    if (mode !== 'off') {
      ctx.err(`${ctx.errorPrefix}Preallocation mode '${mode}' is not supported by lockstep\n`);
      return false;
    }
    let length: number;
    try {
      length = parseIoNumber(args[0]!);
    } catch (e) {
      ctx.out(`${(e as Error).message}\n`);
      return false;
    }
    try {
      await ctx.backend.node.truncate(length);
    } catch (e) {
      ctx.err(`${ctx.errorPrefix}${errorMessage(e)}\n`);
      return false;
    }
    return true;
  },
};

export const sleepCmd: CommandDef = {
  name: 'sleep',
  optstring: '',
  argmin: 1,
  argmax: 1,
  args: '',
  oneline: 'waits for the given value in milliseconds',
  async run(ctx, _opts, args) {
    const text = args[0]!;
    const ms = /^\s*\+?(0x[0-9a-f]+|0[0-7]*|[1-9]\d*)$/i.test(text) ? Number(text.trim().replace(/^\+/, '').replace(/^0(?=[0-7])/, '0o')) : NaN;
    if (!Number.isSafeInteger(ms)) {
      ctx.out(`${text} is not a valid number\n`);
      return false;
    }
    await new Promise((resolve) => setTimeout(resolve, ms));
    return true;
  },
};
