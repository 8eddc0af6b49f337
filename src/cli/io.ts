// `lockstep io`: a qemu-io subset. Opens one image (a filename with -f or a probed format,
// a json:{...} filename, or --image-opts keyval/JSON options), runs each -c command in
// order (or reads commands from stdin when none is given) and exits 1 if any failed.
// The command engine is io-commands.ts; this file is argument parsing and wiring only.

import { toolPerms } from '../block/permissions.js';
import { createInterface } from 'node:readline';
import { BlockGraph } from '../block/graph.js';
import { createRegistry } from '../block/registry.js';
import type { Backend } from '../block/backend.js';
import { isDict, type OptionDict } from '../block/options.js';
import { InvalidArgumentError, errorMessage } from '../errors.js';
import { parseOptionString } from '../util/keyval.js';
import { completeImageOptions, imageOptions } from './image-spec.js';
import { ArgumentError, parseArgs, type LongOption } from './args.js';
import { runIoCommand } from './io-commands.js';

const PROG = 'lockstep io';

const USAGE = `Usage: lockstep io [OPTIONS]... [-c STRING]... [file]
Run qemu-io commands against a disk image.

  --image-opts         treat file as option string (keyval or JSON)
  -c, --cmd STRING     execute command with its arguments
                       from the given string
  -f, --format FMT     specifies the block driver to use
  -r, --read-only      export read-only
  -t, --cache=MODE     use the given cache mode for the image
                       (writeback, unsafe; none and directsync are refused)
  -n, --nocache        disable host cache, short for -t none
  -d, --discard=MODE   use the given discard mode for the image
  -U, --force-share    force shared permissions
  -h, --help           display this help and exit
  -V, --version        output version information and exit

Commands: read, write, discard, flush, length, info, map, alloc, help, quit.
See 'lockstep io -c help' for their syntax (the same as qemu-io's).
`;

const LONG: readonly LongOption[] = [
  { name: 'cmd', hasArg: true, key: 'c' },
  { name: 'format', hasArg: true, key: 'f' },
  { name: 'read-only', hasArg: false, key: 'r' },
  { name: 'cache', hasArg: true, key: 't' },
  { name: 'nocache', hasArg: false, key: 'n' },
  { name: 'discard', hasArg: true, key: 'd' },
  { name: 'force-share', hasArg: false, key: 'U' },
  { name: 'image-opts', hasArg: false, key: 'image-opts' },
  { name: 'help', hasArg: false, key: 'h' },
  { name: 'version', hasArg: false, key: 'V' },
];

interface IoArgs {
  commands: string[];
  format?: string;
  readOnly: boolean;
  imageOpts: boolean;
  cache?: string;
  discard?: string;
  forceShare: boolean;
  file?: string;
}

/** Applies -t/-d/-U to the top node and its file child; true if the write cache is off. */
function applyNodeOptions(dict: OptionDict, keyval: boolean, a: IoArgs): boolean {
  const on = keyval ? 'on' : true;
  const nodes: OptionDict[] = [dict];
  if (isDict(dict.file)) nodes.push(dict.file);
  let writethrough = false;
  if (a.cache !== undefined) {
    let direct = false;
    let noFlush = false;
    switch (a.cache) {
      case 'none':
      case 'off':
      case 'directsync':
        direct = true;
        writethrough = a.cache === 'directsync';
        break;
      case 'writeback':
        break;
      case 'unsafe':
        noFlush = true;
        break;
      case 'writethrough':
        // the write cache is off: every write is FUA (qemu-io's BlockBackend does the same)
        writethrough = true;
        break;
      default:
        throw new InvalidArgumentError(`Invalid cache option: ${a.cache}`);
    }
    for (const n of nodes) {
      const cache = isDict(n.cache) ? n.cache : (n.cache = {});
      if (direct) (cache as OptionDict).direct = on;
      if (noFlush) (cache as OptionDict)['no-flush'] = on;
    }
  }
  if (a.discard !== undefined) {
    if (!['ignore', 'off', 'unmap', 'on'].includes(a.discard)) throw new InvalidArgumentError(`Invalid discard option: ${a.discard}`);
    dict.discard = a.discard;
  }
  if (a.forceShare) {
    if (!a.readOnly) throw new InvalidArgumentError('force-share=on can only be used with read-only images');
    dict['force-share'] = on;
  }
  return writethrough;
}

function parseIoArgs(argv: string[]): IoArgs | 'help' | 'version' {
  const parsed = parseArgs(argv, 'hVc:d:f:rnt:U', LONG);
  const a: IoArgs = { commands: [], readOnly: false, imageOpts: false, forceShare: false };
  for (const { key, value } of parsed.options) {
    switch (key) {
      case 'h':
        return 'help';
      case 'V':
        return 'version';
      case 'c':
        a.commands.push(value);
        break;
      case 'f':
        a.format = value;
        break;
      case 'r':
        a.readOnly = true;
        break;
      case 't':
        a.cache = value;
        break;
      case 'n':
        a.cache = 'none';
        break;
      case 'd':
        a.discard = value;
        break;
      case 'U':
        a.forceShare = true;
        break;
      case 'image-opts':
        a.imageOpts = true;
        break;
    }
  }
  if (parsed.positional.length > 1) throw new ArgumentError(`too many arguments: only one image can be opened`);
  if (parsed.positional[0] !== undefined) a.file = parsed.positional[0];
  if (a.imageOpts && a.format !== undefined) throw new ArgumentError('--image-opts and -f are mutually exclusive');
  return a;
}

async function openImage(graph: BlockGraph, a: IoArgs, warn: (s: string) => void): Promise<Backend> {
  const file = a.file!;
  let dict: OptionDict;
  let keyval: boolean;
  if (a.format !== undefined && !graph.drivers.has(a.format)) throw new InvalidArgumentError(`Unknown driver '${a.format}'`);
  let probed: boolean;
  if (a.imageOpts) {
    const parsed = parseOptionString(file);
    const done = await completeImageOptions(parsed.dict);
    dict = done.dict;
    probed = done.probed;
    keyval = parsed.keyval;
  } else {
    const spec = await imageOptions(file, a.format);
    dict = spec.dict;
    probed = spec.probed;
    keyval = spec.keyval;
  }
  if (probed && dict.driver === 'raw') {
    const name = isDict(dict.file) ? String(dict.file.filename) : file;
    warn(
      `WARNING: Image format was not specified for '${name}' and probing guessed raw.\n` +
        `         Specify the 'raw' format explicitly (-f raw) to silence this warning.\n`,
    );
  }
  const writethrough = applyNodeOptions(dict, keyval, a);
  const node = await graph.open(dict, { keyval, readOnly: a.readOnly });
  const readOnly = a.readOnly || node.readOnly;
  // qemu-io's BlockBackend (blk_new_open): shares everything; -U makes the formats share too
  return graph.createBackend(node, { readOnly, writethrough, perms: toolPerms(!readOnly) });
}

export async function run(argv: string[]): Promise<number> {
  const out = (s: string): void => void process.stdout.write(s);
  const err = (s: string): void => void process.stderr.write(s);
  let a: IoArgs;
  try {
    const r = parseIoArgs(argv);
    if (r === 'help') {
      out(USAGE);
      return 0;
    }
    if (r === 'version') {
      out('lockstep io 0.1.0 (qemu-io 7.2 command syntax)\n');
      return 0;
    }
    a = r;
  } catch (e) {
    err(`${PROG}: ${errorMessage(e)}\n`);
    out(USAGE);
    return 1;
  }

  const graph = new BlockGraph(createRegistry());
  // what drivers report on the way (a qcow2 image marked corrupt) goes to stderr, as QEMU's does
  graph.on('error-log', (msg: string) => err(`${msg}\n`));
  let backend: Backend | null = null;
  if (a.file !== undefined) {
    try {
      backend = await openImage(graph, a, err);
    } catch (e) {
      const where = a.imageOpts ? "can't open" : `can't open device ${a.file}`;
      err(`${PROG}: ${where}: ${errorMessage(e)}\n`);
      await graph.closeAll().catch(() => {});
      return 1;
    }
  }

  let failed = false;
  const execute = async (line: string): Promise<'quit' | void> => {
    const word = line.trim().split(/ +/)[0];
    if (word === 'quit' || word === 'q') return 'quit';
    if (!backend) {
      if (word === '' || word === undefined) return;
      err("no file open, try 'help open'\n");
      failed = true;
      return;
    }
    const ok = await runIoCommand(backend, line, out, { err, errorPrefix: `${PROG}: ` });
    if (!ok) failed = true;
  };

  try {
    if (a.commands.length > 0) {
      for (const c of a.commands) if ((await execute(c)) === 'quit') break;
    } else {
      await interactive(execute, out);
    }
  } finally {
    if (backend) {
      try {
        if (!backend.readOnly) await backend.flush();
      } catch (e) {
        err(`${PROG}: flush failed: ${errorMessage(e)}\n`);
        failed = true;
      }
      graph.releaseBackend(backend);
    }
    try {
      await graph.closeAll();
    } catch (e) {
      err(`${PROG}: closing the image failed: ${errorMessage(e)}\n`);
      failed = true;
    }
  }
  return failed ? 1 : 0;
}

/** Reads commands from stdin, one a line, with qemu-io's prompt, until EOF or quit. */
async function interactive(execute: (line: string) => Promise<'quit' | void>, out: (s: string) => void): Promise<void> {
  const rl = createInterface({ input: process.stdin, terminal: false });
  try {
    out('qemu-io> ');
    for await (const line of rl) {
      if ((await execute(line)) === 'quit') break;
      out('qemu-io> ');
    }
  } finally {
    rl.close();
  }
}
