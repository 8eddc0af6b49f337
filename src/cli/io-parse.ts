// Argument parsing for qemu-io commands: qemu's cvtnum sizes, pattern bytes, getopt(3)
// with GNU permutation, and qemu-io's space-only line splitting.

/** Thrown by cvtnum with qemu-io's wording. */
export class ParseNumberError extends Error {}

/**
 * qemu's cvtnum: a byte count with an optional binary suffix (b k m g t p e, any case),
 * decimal with an optional fraction when a suffix is given, or hex. Returns the value or
 * throws ParseNumberError with the message qemu-io prints.
 */
export function parseIoNumber(text: string): number {
  const m = /^\+?(?:(0x[0-9a-f]+)|(\d+(?:\.\d*)?|\.\d+))([bkmgtpe]?)$/i.exec(text);
  if (!m) throw new ParseNumberError(`Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- ${text}`);
  const suffix = (m[3] ?? '').toLowerCase();
  const mult = 2 ** (10 * 'bkmgtpe'.indexOf(suffix || 'b'));
  let value: number;
  if (m[1] !== undefined) {
    if (BigInt(m[1]) * BigInt(mult) >= 2n ** 63n) throw new ParseNumberError(`Parsing error: argument too large -- ${text}`);
    value = Number(m[1]) * mult;
  } else {
    const num = m[2]!;
    const hasFraction = /\.\d*[1-9]/.test(num);
    if (hasFraction && mult === 1) {
      throw new ParseNumberError(`Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- ${text}`);
    }
    value = Math.floor(Number(num) * mult);
  }
  if (value >= 2 ** 63) throw new ParseNumberError(`Parsing error: argument too large -- ${text}`);
  if (!Number.isSafeInteger(value)) throw new ParseNumberError(`Parsing error: argument too large -- ${text}`);
  return value;
}

/** qemu-io's pattern byte: strtol base 0 (0x.., 0.., decimal), 0..255. */
export function parsePattern(text: string): number | null {
  const t = text.trimStart();
  let v: number;
  if (t === '') v = 0;
  else if (/^[+-]?0x[0-9a-f]+$/i.test(t)) v = Number.parseInt(t.replace(/0x/i, ''), 16) * (t.startsWith('-') ? -1 : 1);
  else if (/^[+-]?0[0-7]*$/.test(t)) v = Number.parseInt(t, 8);
  else if (/^[+-]?[1-9]\d*$/.test(t)) v = Number.parseInt(t, 10);
  else return null;
  return v >= 0 && v <= 255 ? v : null;
}

export class UsageError extends Error {}

/**
 * getopt(3) with GNU permutation: options anywhere until "--"; an argument starting with
 * '-' (other than "-" alone) is an option cluster. Unknown options and missing arguments
 * print getopt's messages to `err` and throw UsageError.
 */
export function getopt(cmd: string, optstring: string, argv: string[], err: (s: string) => void): { opts: Map<string, string>; args: string[] } {
  const opts = new Map<string, string>();
  const args: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--') {
      args.push(...argv.slice(i + 1));
      break;
    }
    if (!a.startsWith('-') || a === '-') {
      args.push(a);
      continue;
    }
    for (let j = 1; j < a.length; j++) {
      const c = a[j]!;
      const at = optstring.indexOf(c);
      if (at < 0 || c === ':') {
        err(`${cmd}: invalid option -- '${c}'\n`);
        throw new UsageError();
      }
      if (optstring[at + 1] === ':') {
        let value: string | undefined = a.slice(j + 1);
        if (value === '') value = argv[++i];
        if (value === undefined) {
          err(`${cmd}: option requires an argument -- '${c}'\n`);
          throw new UsageError();
        }
        opts.set(c, value);
        break;
      }
      opts.set(c, '');
    }
  }
  return { opts, args };
}

/** Splits a command line the way qemu-io does: on spaces, no quoting. */
export function splitCommandLine(line: string): string[] {
  return line.split(' ').filter((s) => s !== '');
}
