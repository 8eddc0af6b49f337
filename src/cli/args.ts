// getopt_long(3)-style command-line parsing for the qemu-compatible subcommands (io, img):
// short option clusters ("-rc CMD"), "--long=value" / "--long value", unique prefixes of
// long options, and GNU argument permutation until "--". Errors use getopt's wording.

import { InvalidArgumentError } from '../errors.js';

export interface LongOption {
  name: string;
  hasArg: boolean;
  /** the key the option is reported under (its short letter, or its name) */
  key: string;
}

export interface ParsedArgs {
  /** options in command-line order (repeatable options appear several times) */
  options: Array<{ key: string; value: string }>;
  positional: string[];
}

/** Thrown on a malformed command line; the message is getopt's, without the program. */
export class ArgumentError extends InvalidArgumentError {
  override name = 'ArgumentError';
}

export function parseArgs(argv: readonly string[], shortOpts: string, longOpts: readonly LongOption[]): ParsedArgs {
  const options: ParsedArgs['options'] = [];
  const positional: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--') {
      positional.push(...argv.slice(i + 1));
      break;
    }
    if (a.startsWith('--')) {
      const eq = a.indexOf('=');
      const name = a.slice(2, eq < 0 ? undefined : eq);
      const exact = longOpts.find((o) => o.name === name);
      const candidates = exact ? [exact] : longOpts.filter((o) => o.name.startsWith(name));
      if (candidates.length === 0) throw new ArgumentError(`unrecognized option '--${name}'`);
      if (candidates.length > 1) throw new ArgumentError(`option '--${name}' is ambiguous`);
      const opt = candidates[0]!;
      if (opt.hasArg) {
        let value: string | undefined = eq < 0 ? undefined : a.slice(eq + 1);
        if (value === undefined) value = argv[++i];
        if (value === undefined) throw new ArgumentError(`option '--${opt.name}' requires an argument`);
        options.push({ key: opt.key, value });
      } else {
        if (eq >= 0) throw new ArgumentError(`option '--${opt.name}' doesn't allow an argument`);
        options.push({ key: opt.key, value: '' });
      }
      continue;
    }
    if (!a.startsWith('-') || a === '-') {
      positional.push(a);
      continue;
    }
    for (let j = 1; j < a.length; j++) {
      const c = a[j]!;
      const at = shortOpts.indexOf(c);
      if (at < 0 || c === ':') throw new ArgumentError(`invalid option -- '${c}'`);
      if (shortOpts[at + 1] === ':') {
        let value: string | undefined = a.slice(j + 1);
        if (value === '') value = argv[++i];
        if (value === undefined) throw new ArgumentError(`option requires an argument -- '${c}'`);
        options.push({ key: c, value });
        break;
      }
      options.push({ key: c, value: '' });
    }
  }
  return { options, positional };
}
