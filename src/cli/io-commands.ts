// The qemu-io command engine: one command line against a Backend, with qemu-io 7.2's
// syntax and output lines, so that scripts written for qemu-io work unchanged. Used by
// `lockstep io` (src/cli/io.ts) and by QMP's `human-monitor-command "qemu-io ..."`.
//
// Commands: read, readv, write, writev, discard, flush, truncate, length, info, map, alloc,
// sleep, help. Like qemu-io, map and alloc report the allocation of the image's own layer,
// not of its backing chain. Numbers take qemu's size suffixes (b, k, M, G, T, P, E; "1.5k"; "0x100"). Options are parsed like
// getopt(3) with argument permutation ("read 0 4k -q" works, "read 0 -1" does not).
// Messages go where qemu-io sends them: results, usage and I/O failures to `out`
// (stdout), argument-count, unknown-option and unknown-command errors to `err` (stderr).

import { errorMessage } from '../errors.js';
import type { Backend } from '../block/backend.js';
import { getopt, splitCommandLine, UsageError } from './io-parse.js';
import { usageLine, type CommandDef, type Ctx, type IoCommandOptions } from './io-cmd-common.js';
import { discardCmd, readCmd, readvCmd, writeCmd, writevCmd } from './io-cmd-data.js';
import { allocCmd, flushCmd, infoCmd, lengthCmd, mapCmd, sleepCmd, truncateCmd } from './io-cmd-image.js';

export { MAX_REQUEST_BYTES, type IoCommandOptions } from './io-cmd-common.js';

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
const COMMANDS: readonly CommandDef[] = [
  allocCmd,
  discardCmd,
  flushCmd,
  helpCmd,
  infoCmd,
  lengthCmd,
  mapCmd,
  readCmd,
  readvCmd,
  sleepCmd,
  truncateCmd,
  writeCmd,
  writevCmd,
];

function findCommand(name: string): CommandDef | undefined {
  return COMMANDS.find((c) => c.name === name || c.altname === name);
}

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

