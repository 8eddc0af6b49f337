// qemu-io's data commands: read, readv, write, writev, discard.

import { readFile } from 'node:fs/promises';
import { STRERROR, strerror } from '../errors.js';
import { hexDump, ioReport } from './io-format.js';
import { parseIoNumber, parsePattern } from './io-parse.js';
import {
  DEFAULT_WRITE_PATTERN,
  elapsedSince,
  errnoText,
  parseOffLen,
  parseVector,
  usageLine,
  type CommandDef,
} from './io-cmd-common.js';

export const readCmd: CommandDef = {
  name: 'read',
  optstring: 'abCcl:pP:qs:v',
  argmin: 2,
  argmax: -1,
  args: '[-abCqv] [-P pattern [-s off] [-l len]] off len',
  oneline: 'reads a number of bytes at a specified offset',
  help: [
    '',
    ' reads a range of bytes from the given offset',
    '',
    ' Example:',
    " 'read -v 512 1k' - dumps 1 kilobyte read from 512 bytes into the file",
    '',
    ' -C, -- report statistics in a machine parsable format',
    ' -l, -- length for pattern verification (only with -P)',
    ' -p, -- ignored for backwards compatibility',
    ' -P, -- use a pattern to verify read data',
    ' -q, -- quiet mode, do not show I/O statistics',
    ' -s, -- start offset for pattern verification (only with -P)',
    ' -v, -- dump buffer to standard output',
    '',
  ].join('\n'),
  async run(ctx, opts, args) {
    let pattern: number | null = null;
    let patternOffset = 0;
    let patternCount: number | undefined;
    if (opts.has('P')) {
      pattern = parsePattern(opts.get('P')!);
      if (pattern === null) {
        ctx.out(`${opts.get('P')!} is not a valid pattern byte\n`);
        return false;
      }
    }
    try {
      if (opts.has('l')) patternCount = parseIoNumber(opts.get('l')!);
      if (opts.has('s')) patternOffset = parseIoNumber(opts.get('s')!);
    } catch (e) {
      ctx.out(`${(e as Error).message}\n`);
      return false;
    }
    const ol = parseOffLen(ctx, this, args);
    if (!ol) return false;
    const { offset, count } = ol;
    if (pattern === null && (opts.has('l') || opts.has('s'))) {
      ctx.out(usageLine(this));
      return false;
    }
    const verifyCount = patternCount ?? count - patternOffset;
    if (verifyCount < 0 || verifyCount + patternOffset > count) {
      ctx.out('pattern verification range exceeds end of read data\n');
      return false;
    }
    if (opts.has('b')) {
      ctx.out(`read failed: ${STRERROR.ENOTSUP}\n`);
      return false;
    }
    const start = process.hrtime.bigint();
    let buf: Buffer;
    try {
      buf = await ctx.backend.read(offset, count);
    } catch (e) {
      ctx.out(`read failed: ${errnoText(e)}\n`);
      return false;
    }
    const seconds = elapsedSince(start);
    let ok = true;
    if (pattern !== null) {
      const view = buf.subarray(patternOffset, patternOffset + verifyCount);
      const expected = Buffer.alloc(verifyCount, pattern);
      if (!view.equals(expected)) {
        ctx.out(`Pattern verification failed at offset ${offset + patternOffset}, ${verifyCount} bytes\n`);
        ok = false;
      }
    }
    if (opts.has('q')) return ok;
    if (opts.has('v')) ctx.out(hexDump(buf, offset));
    ctx.out(ioReport('read', seconds, offset, count, count, 1, opts.has('C')));
    return ok;
  },
};

export const writeCmd: CommandDef = {
  name: 'write',
  optstring: 'bcCfnpP:quzs:',
  argmin: 2,
  argmax: -1,
  writes: true,
  args: '[-bcCfnquz] [-P pattern | -s source_file] off len',
  oneline: 'writes a number of bytes at a specified offset',
  help: [
    '',
    ' writes a range of bytes from the given offset',
    '',
    ' Example:',
    " 'write 512 1k' - writes 1 kilobyte at 512 bytes into the open file",
    '',
    ' Writes into a segment of the currently open file, using a buffer',
    ' filled with a set pattern (0xcdcdcdcd).',
    ' -c, -- write compressed data (not supported by lockstep)',
    ' -f, -- use Force Unit Access semantics',
    ' -n, -- with -z, don\'t allow slow fallback',
    ' -p, -- ignored for backwards compatibility',
    ' -P, -- use different pattern to fill file',
    ' -s, -- use a pattern file to fill the write buffer',
    ' -C, -- report statistics in a machine parsable format',
    ' -q, -- quiet mode, do not show I/O statistics',
    ' -u, -- with -z, allow unmapping',
    ' -z, -- write zeroes',
    '',
  ].join('\n'),
  async run(ctx, opts, args) {
    const fua = opts.has('f');
    const zero = opts.has('z');
    let pattern = DEFAULT_WRITE_PATTERN;
    if (opts.has('P')) {
      const p = parsePattern(opts.get('P')!);
      if (p === null) {
        ctx.out(`${opts.get('P')!} is not a valid pattern byte\n`);
        return false;
      }
      pattern = p;
    }
    if (args.length !== 2) {
      ctx.out(usageLine(this));
      return false;
    }
    if (opts.has('b') && zero) {
      ctx.out('-b and -z cannot be specified at the same time\n');
      return false;
    }
    if (fua && (opts.has('b') || opts.has('c'))) {
      ctx.out('-f and -b or -c cannot be specified at the same time\n');
      return false;
    }
    if (opts.has('n') && !zero) {
      ctx.out('-n requires -z to be specified\n');
      return false;
    }
    if (opts.has('u') && !zero) {
      ctx.out('-u requires -z to be specified\n');
      return false;
    }
    if (Number(zero) + Number(opts.has('P')) + Number(opts.has('s')) > 1) {
      ctx.out('Only one of -z, -P, and -s can be specified at the same time\n');
      return false;
    }
    const ol = parseOffLen(ctx, this, args);
    if (!ol) return false;
    const { offset, count } = ol;
    if (opts.has('b') || opts.has('c')) {
      ctx.out(`write failed: ${STRERROR.ENOTSUP}\n`);
      return false;
    }
    let buf: Buffer | null = null;
    if (!zero) {
      if (opts.has('s')) {
        const source = opts.get('s')!;
        let content: Buffer;
        try {
          content = await readFile(source);
        } catch (e) {
          ctx.out(`${source}: ${strerror(e)}\n`);
          return false;
        }
        // like qemu-io, the file's content repeats to fill the buffer
        buf = Buffer.alloc(count);
        if (content.length > 0) for (let pos = 0; pos < count; pos += content.length) content.copy(buf, pos);
      } else {
        buf = Buffer.alloc(count, pattern);
      }
    }
    const start = process.hrtime.bigint();
    try {
      if (buf) await ctx.backend.write(offset, buf, { fua });
      else await ctx.backend.writeZeroes(offset, count, { fua, mayUnmap: opts.has('u'), noFallback: opts.has('n') });
    } catch (e) {
      ctx.out(`write failed: ${errnoText(e)}\n`);
      return false;
    }
    const seconds = elapsedSince(start);
    if (!opts.has('q')) ctx.out(ioReport('wrote', seconds, offset, count, count, 1, opts.has('C')));
    return true;
  },
};

export const discardCmd: CommandDef = {
  name: 'discard',
  optstring: 'Cq',
  argmin: 2,
  argmax: -1,
  writes: true,
  args: '[-Cq] off len',
  oneline: 'discards a number of bytes at a specified offset',
  help: [
    '',
    ' discards a range of bytes from the given offset',
    '',
    ' Example:',
    " 'discard 512 1k' - discards 1 kilobyte from 512 bytes into the file",
    '',
    ' -C, -- report statistics in a machine parsable format',
    ' -q, -- quiet mode, do not show I/O statistics',
    '',
  ].join('\n'),
  async run(ctx, opts, args) {
    const ol = parseOffLen(ctx, this, args);
    if (!ol) return false;
    const start = process.hrtime.bigint();
    try {
      await ctx.backend.discard(ol.offset, ol.count);
    } catch (e) {
      ctx.out(`discard failed: ${errnoText(e)}\n`);
      return false;
    }
    const seconds = elapsedSince(start);
    if (!opts.has('q')) ctx.out(ioReport('discard', seconds, ol.offset, ol.count, ol.count, 1, opts.has('C')));
    return true;
  },
};

export const readvCmd: CommandDef = {
  name: 'readv',
  optstring: 'CP:qv',
  argmin: 2,
  argmax: -1,
  args: '[-Cqv] [-P pattern] off len [len..]',
  oneline: 'reads a number of bytes at a specified offset',
  help: '\n reads a range of bytes from the given offset into multiple buffers (one read in lockstep)\n',
  async run(ctx, opts, args) {
    let pattern: number | null = null;
    if (opts.has('P')) {
      pattern = parsePattern(opts.get('P')!);
      if (pattern === null) {
        ctx.out(`${opts.get('P')!} is not a valid pattern byte\n`);
        return false;
      }
    }
    const v = parseVector(ctx, this, args);
    if (!v) return false;
    const start = process.hrtime.bigint();
    let buf: Buffer;
    try {
      buf = await ctx.backend.read(v.offset, v.count);
    } catch (e) {
      ctx.out(`readv failed: ${errnoText(e)}\n`);
      return false;
    }
    const seconds = elapsedSince(start);
    let ok = true;
    if (pattern !== null && !buf.equals(Buffer.alloc(v.count, pattern))) {
      ctx.out(`Pattern verification failed at offset ${v.offset}, ${v.count} bytes\n`);
      ok = false;
    }
    if (opts.has('q')) return ok;
    if (opts.has('v')) ctx.out(hexDump(buf, v.offset));
    ctx.out(ioReport('read', seconds, v.offset, v.count, v.count, 1, opts.has('C')));
    return ok;
  },
};

export const writevCmd: CommandDef = {
  name: 'writev',
  optstring: 'CfqP:',
  argmin: 2,
  argmax: -1,
  writes: true,
  args: '[-Cfq] [-P pattern] off len [len..]',
  oneline: 'writes a number of bytes at a specified offset',
  help: '\n writes a range of bytes from the given offset from multiple buffers (one write in lockstep)\n',
  async run(ctx, opts, args) {
    let pattern = DEFAULT_WRITE_PATTERN;
    if (opts.has('P')) {
      const p = parsePattern(opts.get('P')!);
      if (p === null) {
        ctx.out(`${opts.get('P')!} is not a valid pattern byte\n`);
        return false;
      }
      pattern = p;
    }
    const v = parseVector(ctx, this, args);
    if (!v) return false;
    const start = process.hrtime.bigint();
    try {
      await ctx.backend.write(v.offset, Buffer.alloc(v.count, pattern), { fua: opts.has('f') });
    } catch (e) {
      ctx.out(`writev failed: ${errnoText(e)}\n`);
      return false;
    }
    const seconds = elapsedSince(start);
    if (!opts.has('q')) ctx.out(ioReport('wrote', seconds, v.offset, v.count, v.count, 1, opts.has('C')));
    return true;
  },
};
