// The qemu-io command engine: one command line against a Backend, with qemu-io 7.2's
// syntax and output lines, so that scripts written for qemu-io work unchanged. Used by
// `lockstep io` (src/cli/io.ts) and by QMP's `human-monitor-command "qemu-io ..."`.
//
// Commands: read, write, discard, flush, length, info, map, alloc, help. Like qemu-io, map
// and alloc report the allocation of the image's own layer, not of its backing chain. Numbers take
// qemu's size suffixes (b, k, M, G, T, P, E; "1.5k"; "0x100"). Options are parsed like
// getopt(3) with argument permutation ("read 0 4k -q" works, "read 0 -1" does not).
// Messages go where qemu-io sends them: results, usage and I/O failures to `out`
// (stdout), argument-count, unknown-option and unknown-command errors to `err` (stderr).

import { readFile } from 'node:fs/promises';
import { BlockError, STRERROR, errorMessage } from '../errors.js';
import type { Backend } from '../block/backend.js';
import type { BlockNode } from '../block/node.js';
import { hexDump, humanSize, ioReport } from './io-format.js';
import { UsageError, getopt, parseIoNumber, parsePattern, splitCommandLine } from './io-parse.js';

export interface IoCommandOptions {
  /** where qemu-io writes to stderr; defaults to `out` (the monitor has one stream) */
  err?: (s: string) => void;
  /** prefix of error_report()-style lines ("lockstep io: "); none by default */
  errorPrefix?: string;
}

/** QEMU's BDRV_REQUEST_MAX_BYTES: the largest single request qemu-io accepts. */
export const MAX_REQUEST_BYTES = 2147483136;

const DEFAULT_WRITE_PATTERN = 0xcd;

interface Ctx {
  backend: Backend;
  out: (s: string) => void;
  err: (s: string) => void;
  errorPrefix: string;
}

interface CommandDef {
  name: string;
  altname?: string;
  /** getopt(3) option string */
  optstring: string;
  argmin: number;
  /** -1: unbounded */
  argmax: number;
  args: string;
  oneline: string;
  help?: string;
  /** needs write permission */
  writes?: boolean;
  run(ctx: Ctx, opts: Map<string, string>, args: string[]): Promise<boolean>;
}

// ---- helpers ------------------------------------------------------------------------------

function errnoText(e: unknown): string {
  if (e instanceof BlockError) return STRERROR[e.code];
  return errorMessage(e);
}

function elapsedSince(start: bigint): number {
  return Number(process.hrtime.bigint() - start) / 1e9;
}

function usageLine(def: CommandDef): string {
  return `${def.name} ${def.args} -- ${def.oneline}\n`;
}

/**
 * Allocation in the whole chain at `offset` (qemu's bdrv_is_allocated_above down to the
 * bottom): whether some layer defines the bytes, and for how many bytes that holds.
 */
export async function isAllocatedAbove(node: BlockNode, offset: number, length: number): Promise<{ allocated: boolean; length: number }> {
  const s = await node.blockStatus(offset, length);
  if (s.allocated) return { allocated: true, length: s.length };
  const backing = node.backing;
  if (!backing) return { allocated: false, length: s.length };
  const backingLen = backing.getLength();
  if (offset >= backingLen) return { allocated: false, length: s.length };
  const below = await isAllocatedAbove(backing, offset, Math.min(s.length, backingLen - offset));
  return below;
}

/** Parses `off len` for read/write/discard; prints qemu-io's messages on failure. */
function parseOffLen(ctx: Ctx, def: CommandDef, args: string[]): { offset: number; count: number; countText: string } | null {
  if (args.length !== 2) {
    ctx.out(usageLine(def));
    return null;
  }
  let offset: number;
  let count: number;
  try {
    offset = parseIoNumber(args[0]!);
    count = parseIoNumber(args[1]!);
  } catch (e) {
    ctx.out(`${(e as Error).message}\n`);
    return null;
  }
  if (count > MAX_REQUEST_BYTES) {
    ctx.out(`length cannot exceed ${MAX_REQUEST_BYTES}, given ${args[1]}\n`);
    return null;
  }
  return { offset, count, countText: args[1]! };
}

// ---- commands -------------------------------------------------------------------------------

const readCmd: CommandDef = {
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

const writeCmd: CommandDef = {
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
          const code = (e as { code?: string }).code;
          ctx.out(`${source}: ${code && code in STRERROR ? STRERROR[code as keyof typeof STRERROR] : errorMessage(e)}\n`);
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

const discardCmd: CommandDef = {
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

const flushCmd: CommandDef = {
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

const lengthCmd: CommandDef = {
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

const infoCmd: CommandDef = {
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

const mapCmd: CommandDef = {
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

const allocCmd: CommandDef = {
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

const helpCmd: CommandDef = {
  name: 'help',
  altname: '?',
  optstring: '',
  argmin: 0,
  argmax: 1,
  args: '[command]',
  oneline: 'help for one or all commands',
  async run(ctx, _opts, args) {
    if (args.length === 0) {
      for (const def of COMMANDS) ctx.out(usageLine(def));
      ctx.out("\nUse 'help commandname' for extended help.\n");
      return true;
    }
    const def = findCommand(args[0]!);
    if (!def) {
      ctx.out(`command ${args[0]!} not found\n`);
      return false;
    }
    ctx.out(usageLine(def));
    if (def.help) ctx.out(def.help + '\n');
    return true;
  },
};

/** Sorted by name, as qemu-io lists them. */
const COMMANDS: readonly CommandDef[] = [allocCmd, discardCmd, flushCmd, helpCmd, infoCmd, lengthCmd, mapCmd, readCmd, writeCmd];

function findCommand(name: string): CommandDef | undefined {
  return COMMANDS.find((c) => c.name === name || c.altname === name);
}

/** Names of the commands the engine knows (for the CLI's interactive `quit`). */
export const IO_COMMAND_NAMES: readonly string[] = COMMANDS.map((c) => c.name);

/**
 * Runs one qemu-io command line against `backend`, writing its output through `out`
 * (and stderr-type messages through `opts.err`, by default `out` too). Resolves true on
 * success, false when the command failed (qemu-io then exits non-zero). Never throws for
 * user errors; an empty line succeeds and prints nothing.
 */
export async function runIoCommand(backend: Backend, line: string, out: (s: string) => void, opts: IoCommandOptions = {}): Promise<boolean> {
  const ctx: Ctx = { backend, out, err: opts.err ?? out, errorPrefix: opts.errorPrefix ?? '' };
  const argv = splitCommandLine(line);
  if (argv.length === 0) return true;
  const name = argv[0]!;
  const def = findCommand(name);
  if (!def) {
    ctx.err(`command "${name}" not found\n`);
    return false;
  }
  const argc = argv.length - 1;
  if (argc < def.argmin || (def.argmax !== -1 && argc > def.argmax)) {
    let expected: string;
    if (def.argmax === -1) expected = `at least ${def.argmin} arguments`;
    else if (def.argmin === def.argmax) expected = `${def.argmin} arguments`;
    else expected = `between ${def.argmin} and ${def.argmax} arguments`;
    ctx.err(`bad argument count ${argc} to ${name}, expected ${expected}\n`);
    return false;
  }
  if (def.writes && (backend.readOnly || backend.node.readOnly)) {
    ctx.err(`${ctx.errorPrefix}Block node is read-only\n`);
    return false;
  }
  let parsed: { opts: Map<string, string>; args: string[] };
  try {
    parsed = getopt(name, def.optstring, argv.slice(1), ctx.err);
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    ctx.out(usageLine(def));
    return false;
  }
  try {
    return await def.run(ctx, parsed.opts, parsed.args);
  } catch (e) {
    // a failure the command did not anticipate: one line, never a stack trace
    ctx.err(`${ctx.errorPrefix}${name}: ${errorMessage(e)}\n`);
    return false;
  }
}

