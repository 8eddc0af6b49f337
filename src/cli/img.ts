// `lockstep img`: a qemu-img subset with its syntax, output lines and exit codes:
// create, info, check, map, compare, commit, rebase (-u), convert, bench. Argument parsing
// and wiring here; the work is in src/cli/img/.

import { strerror } from '../errors.js';
import { ArgumentError, parseArgs, type LongOption, type ParsedArgs } from './args.js';
import { EXIT_NO_CHECKS, runCheck } from './img/check.js';
import { ImgError, PROG, openImage, withGraph, parseImageSize, type Io, type OpenSpec } from './img/common.js';
import { runCompare } from './img/compare.js';
import { runCommit, runConvert } from './img/convert.js';
import { parseCreateOptions, runCreate } from './img/create.js';
import { mapEntries, mapHuman, mapJson, runInfo } from './img/info.js';
import { runBench } from './img/bench.js';
import { runRebase } from './img/rebase.js';

const USAGE = `Usage: lockstep img <command> [command options]
A qemu-img subset: the same syntax, output and exit codes.

  create [-q] [-f fmt] [-b backing_file -F backing_fmt] [-o options] filename [size]
  info [--image-opts] [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename
  check [--image-opts] [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-U] filename
  map [--image-opts] [-f fmt] [--start-offset=offset] [--max-length=len] [--output=ofmt] [-U] filename
  compare [--image-opts] [-f fmt] [-F fmt] [-p] [-q] [-s] [-U] filename1 filename2
  commit [--image-opts] [-q] [-f fmt] [-t cache] [-b base] [-d] [-p] filename
  rebase [--image-opts] [-q] [-f fmt] -u -b backing_file [-F backing_fmt] filename
  convert [--image-opts] [-p] [-q] [-n] [-f fmt] [-t cache] [-T src_cache] [-O output_fmt] [-o options] filename output_filename
  bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] [--no-drain] [-o offset]
        [--pattern=pattern] [-q] [-s buffer_size] [-S step_size] [-t cache] [-w] [-U] filename

Formats: raw, qcow2. Sizes take k, M, G, T, P, E suffixes.
`;

const COMMON_LONG: LongOption[] = [
  { name: 'help', hasArg: false, key: 'h' },
  { name: 'image-opts', hasArg: false, key: 'image-opts' },
  { name: 'force-share', hasArg: false, key: 'U' },
  { name: 'output', hasArg: true, key: 'output' },
  { name: 'object', hasArg: true, key: 'object' },
];

class Opts {
  constructor(readonly parsed: ParsedArgs) {}
  has(key: string): boolean {
    return this.parsed.options.some((o) => o.key === key);
  }
  get(key: string): string | undefined {
    let v: string | undefined;
    for (const o of this.parsed.options) if (o.key === key) v = o.value;
    return v;
  }
  all(key: string): string[] {
    return this.parsed.options.filter((o) => o.key === key).map((o) => o.value);
  }
  get positional(): string[] {
    return this.parsed.positional;
  }
}

function parse(argv: string[], short: string, long: LongOption[] = []): Opts {
  return new Opts(parseArgs(argv, short, [...COMMON_LONG, ...long]));
}

function outputJson(o: Opts): boolean {
  const v = o.get('output');
  if (v === undefined || v === 'human') return false;
  if (v === 'json') return true;
  throw new ImgError('--output must be used with human or json as argument.');
}

function oneFile(o: Opts, what = 'filename'): string {
  if (o.positional.length === 0) throw new ImgError(`Expecting one image file name`);
  if (o.positional.length > 1) throw new ImgError(`Expecting one image file name (extra argument '${o.positional[1]!}' after ${what})`);
  return o.positional[0]!;
}

function openSpec(o: Opts, filename: string, formatKey = 'f'): OpenSpec {
  const spec: OpenSpec = { filename };
  const f = o.get(formatKey);
  if (o.has('image-opts')) {
    if (f !== undefined) throw new ImgError('--image-opts and --format are mutually exclusive');
    spec.imageOpts = true;
  } else if (f !== undefined) spec.format = f;
  return spec;
}

function number(text: string, what: string): number {
  const n = parseImageSize(text);
  if (n === null) throw new ImgError(`Invalid ${what} specified: '${text}'`);
  return n;
}

function integer(text: string, what: string, min: number): number {
  if (!/^\d+$/.test(text) || Number(text) < min || !Number.isSafeInteger(Number(text))) throw new ImgError(`Invalid ${what} specified: '${text}'`);
  return Number(text);
}

// ---- subcommands --------------------------------------------------------------------------

async function create(io: Io, argv: string[]): Promise<number> {
  const o = parse(argv, 'F:b:f:ho:qu');
  if (o.has('h')) return help(io);
  const filename = o.positional[0];
  if (filename === undefined) throw new ImgError('Expecting image file name');
  if (o.positional.length > 2) throw new ImgError(`Unexpected argument: ${o.positional[2]!}`);
  let size: number | undefined;
  if (o.positional[1] !== undefined) {
    const s = parseImageSize(o.positional[1]);
    if (s === null) {
      throw new ImgError(
        'Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n' +
          `${PROG}: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.`,
      );
    }
    size = s;
  }
  const options = o.all('o').flatMap(parseCreateOptions);
  const spec: Parameters<typeof runCreate>[0] = { filename, format: o.get('f') ?? 'raw', options };
  if (size !== undefined) spec.size = size;
  const b = o.get('b');
  const bf = o.get('F');
  if (b !== undefined) spec.backingFile = b;
  if (bf !== undefined) spec.backingFormat = bf;
  return runCreate(spec, io.out, o.has('q'));
}

async function info(io: Io, argv: string[]): Promise<number> {
  const o = parse(argv, 'f:hU', [{ name: 'backing-chain', hasArg: false, key: 'backing-chain' }, { name: 'format', hasArg: true, key: 'f' }]);
  if (o.has('h')) return help(io);
  const json = outputJson(o);
  return withGraph(async (graph) => {
    const img = await openImage(graph, { ...openSpec(o, oneFile(o)), readOnly: true, noIo: true });
    return await runInfo(io, img.node, img.filename, json, o.has('backing-chain'));
  });
}

async function check(io: Io, argv: string[]): Promise<number> {
  const o = parse(argv, 'hf:r:T:qU', [{ name: 'repair', hasArg: true, key: 'r' }, { name: 'format', hasArg: true, key: 'f' }]);
  if (o.has('h')) return help(io);
  const json = outputJson(o);
  const r = o.get('r');
  if (r !== undefined && r !== 'leaks' && r !== 'all') throw new ArgumentError(`Unknown option value for -r (expecting 'leaks' or 'all'): ${r}`);
  if (o.has('image-opts')) throw new ImgError('check with --image-opts is not supported by lockstep: pass a filename');
  return runCheck(io, oneFile(o), o.get('f'), r as 'leaks' | 'all' | undefined, json, o.has('q'));
}

async function map(io: Io, argv: string[]): Promise<number> {
  const o = parse(argv, 'f:hU', [
    { name: 'start-offset', hasArg: true, key: 's' },
    { name: 'max-length', hasArg: true, key: 'l' },
    { name: 'format', hasArg: true, key: 'f' },
  ]);
  if (o.has('h')) return help(io);
  const json = outputJson(o);
  const start = o.get('s') !== undefined ? number(o.get('s')!, 'start offset') : 0;
  const maxLength = o.get('l') !== undefined ? number(o.get('l')!, 'max length') : Infinity;
  return withGraph(async (graph) => {
    const img = await openImage(graph, { ...openSpec(o, oneFile(o)), readOnly: true });
    const entries = await mapEntries(img.node, start, maxLength);
    io.out(json ? mapJson(entries) : mapHuman(entries));
    return 0;
  });
}

async function compare(io: Io, argv: string[]): Promise<number> {
  const o = parse(argv, 'hf:F:T:pqsU');
  if (o.has('h')) return help(io);
  if (o.positional.length !== 2) throw new ImgError('Expecting two image file names');
  const [fa, fb] = o.positional as [string, string];
  try {
    return await withGraph(async (graph) => {
      const specA = openSpec(o, fa, 'f');
      // -F defaults to -f, as in qemu-img
      const specB: OpenSpec = o.has('image-opts') ? { filename: fb, imageOpts: true } : { filename: fb };
      const fmtB = o.get('F') ?? o.get('f');
      if (!o.has('image-opts') && fmtB !== undefined) specB.format = fmtB;
      const a = await openImage(graph, { ...specA, readOnly: true });
      const b = await openImage(graph, { ...specB, readOnly: true });
      return await runCompare(io, a.backend, b.backend, { strict: o.has('s'), quiet: o.has('q'), progress: o.has('p') });
    });
  } catch (e) {
    // compare reports errors with exit code 2 (1 means "different")
    if (e instanceof ImgError) throw new ImgError(e.message, 2);
    throw new ImgError(strerror(e), 2);
  }
}

async function commit(io: Io, argv: string[]): Promise<number> {
  const o = parse(argv, 'f:ht:b:dpqr:');
  if (o.has('h')) return help(io);
  if (o.has('r')) throw new ImgError('commit -r (rate limit) is not supported by lockstep');
  const spec = openSpec(o, oneFile(o));
  const t = o.get('t');
  if (t !== undefined) spec.cache = t;
  const c: Parameters<typeof runCommit>[1] = { image: spec, keep: o.has('d'), progress: o.has('p'), quiet: o.has('q') };
  const base = o.get('b');
  if (base !== undefined) c.base = base;
  return runCommit(io, c);
}

async function rebase(io: Io, argv: string[]): Promise<number> {
  const o = parse(argv, 'hf:F:b:upt:T:qU');
  if (o.has('h')) return help(io);
  const filename = oneFile(o);
  const backing = o.get('b');
  if (backing === undefined) throw new ImgError('Must specify backing file (-b) or use -b "" to remove it');
  if (!o.has('u')) throw new ImgError('only unsafe rebase (-u) is supported by lockstep: it changes the backing file name without copying data');
  const fmt = o.get('f');
  if (fmt !== undefined && fmt !== 'qcow2') throw new ImgError(`Could not change the backing file to '${backing}': Operation not supported`);
  if (backing !== '' && o.get('F') === undefined) throw new ImgError('-F (backing format) is required with -b');
  return runRebase(filename, backing, o.get('F'));
}

async function convert(io: Io, argv: string[]): Promise<number> {
  const o = parse(argv, 'hf:O:o:pqnt:T:US:cWm:C', [{ name: 'target-image-opts', hasArg: false, key: 'target-image-opts' }]);
  if (o.has('h')) return help(io);
  if (o.has('c')) throw new ImgError('compressed output (-c) is not supported by lockstep');
  if (o.has('target-image-opts')) throw new ImgError('--target-image-opts is not supported by lockstep');
  if (o.positional.length < 2) throw new ImgError('Must specify image file name');
  if (o.positional.length > 2) throw new ImgError('converting several source images into one is not supported by lockstep');
  const [src, dst] = o.positional as [string, string];
  const source = openSpec(o, src);
  const T = o.get('T');
  if (T !== undefined) source.cache = T;
  const spec: Parameters<typeof runConvert>[1] = {
    source,
    target: dst,
    targetFormat: o.get('O') ?? 'raw',
    createOptions: o.all('o').flatMap(parseCreateOptions),
    progress: o.has('p'),
    quiet: o.has('q'),
    noCreate: o.has('n'),
  };
  const t = o.get('t');
  if (t !== undefined) spec.targetCache = t;
  return runConvert(io, spec);
}

async function bench(io: Io, argv: string[]): Promise<number> {
  const o = parse(argv, 'hc:d:f:ni:o:qs:S:t:wU', [
    { name: 'pattern', hasArg: true, key: 'pattern' },
    { name: 'flush-interval', hasArg: true, key: 'flush-interval' },
    { name: 'no-drain', hasArg: false, key: 'no-drain' },
  ]);
  if (o.has('h')) return help(io);
  const write = o.has('w');
  const spec: Parameters<typeof runBench>[2] = {
    write,
    count: o.get('c') !== undefined ? integer(o.get('c')!, 'request count', 1) : 75000,
    depth: o.get('d') !== undefined ? integer(o.get('d')!, 'queue depth', 1) : 64,
    bufsize: o.get('s') !== undefined ? number(o.get('s')!, 'buffer size') : 4096,
    step: o.get('S') !== undefined ? number(o.get('S')!, 'step size') : 0,
    offset: o.get('o') !== undefined ? number(o.get('o')!, 'offset') : 0,
    pattern: o.get('pattern') !== undefined ? integer(o.get('pattern')!, 'pattern byte', 0) : 0,
    flushInterval: o.get('flush-interval') !== undefined ? integer(o.get('flush-interval')!, 'flush interval', 0) : 0,
    drain: !o.has('no-drain'),
  };
  if (spec.pattern > 255) throw new ImgError(`Invalid pattern byte specified: '${o.get('pattern')!}'`);
  if (spec.bufsize === 0) throw new ImgError(`Invalid buffer size specified: '${o.get('s')!}'`);
  if (spec.flushInterval && !write) throw new ImgError('--flush-interval is only available in write tests');
  if (o.has('pattern') && !write) throw new ImgError('--pattern is only available in write tests');
  if (spec.flushInterval && spec.flushInterval < spec.depth) throw new ImgError("Flush interval can't be smaller than depth");
  if (o.has('no-drain') && !spec.flushInterval) throw new ImgError('--no-drain requires --flush-interval');
  const imgSpec = openSpec(o, oneFile(o));
  const t = o.get('t');
  if (t !== undefined) imgSpec.cache = t;
  return withGraph(async (graph) => {
    const img = await openImage(graph, { ...imgSpec, readOnly: !write });
    return await runBench(io, img.backend, spec);
  });
}

function help(io: Io): number {
  io.out(USAGE);
  return 0;
}

const SUBCOMMANDS: Record<string, (io: Io, argv: string[]) => Promise<number>> = {
  create,
  info,
  check,
  map,
  compare,
  commit,
  rebase,
  convert,
  bench,
};

export async function run(argv: string[]): Promise<number> {
  const io: Io = { out: (s) => void process.stdout.write(s), err: (s) => void process.stderr.write(s) };
  const [cmd, ...rest] = argv;
  if (cmd === undefined) {
    io.err(`${PROG}: Not enough arguments\nTry 'lockstep img --help' for more information\n`);
    return 1;
  }
  if (cmd === '--help' || cmd === '-h' || cmd === 'help') return help(io);
  if (cmd === '--version' || cmd === '-V') {
    io.out('lockstep img 0.1.0 (qemu-img 7.2 command syntax)\n');
    return 0;
  }
  const sub = SUBCOMMANDS[cmd];
  if (!sub) {
    io.err(`${PROG}: Command not found: ${cmd}\n`);
    return 1;
  }
  try {
    return await sub(io, rest);
  } catch (e) {
    if (e instanceof ArgumentError) {
      io.err(`${PROG}: ${e.message}\nTry 'lockstep img --help' for more information\n`);
      return 1;
    }
    const code = e instanceof ImgError ? e.code : cmd === 'compare' ? 2 : 1;
    io.err(`${PROG}: ${strerror(e)}\n`);
    return code;
  }
}

export { EXIT_NO_CHECKS };
