// Typed access to a nested option dictionary (QEMU's QDict), with QAPI's error messages.
// Options arrive in two spellings: keyval (every leaf a string, "on"/"off", sizes with
// suffixes) and JSON (typed leaves). The reader knows which one it reads, so that JSON gets
// QAPI's strict type errors and keyval its parsing errors. Parameter names in errors are the
// full dotted path ("Parameter 'file.backing.backing' is unexpected").

import { InvalidArgumentError } from '../errors.js';
import { isDict, type OptionDict } from '../util/dict.js';
import { literalKind } from '../util/json-literals.js';

export { isDict, type OptionDict };

const SIZE_SUFFIX: Record<string, number> = {
  '': 1,
  b: 1,
  k: 1024,
  m: 1024 ** 2,
  g: 1024 ** 3,
  t: 1024 ** 4,
  p: 1024 ** 5,
  e: 1024 ** 6,
};

/** Parses "64M", "1.5G", "512" (bytes by default); null when malformed. */
export function parseSize(text: string, defaultSuffix = ''): number | null {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([bkmgtpe]?)\s*$/i.exec(text);
  if (!m) return null;
  const suffix = (m[2] || defaultSuffix).toLowerCase();
  const mult = SIZE_SUFFIX[suffix];
  if (mult === undefined) return null;
  const value = Number(m[1]) * mult;
  if (!Number.isSafeInteger(value)) {
    if (!Number.isFinite(value) || value > Number.MAX_SAFE_INTEGER) return null;
    return Math.round(value) === value ? value : null;
  }
  return value;
}

export class OptionReader {
  private readonly taken = new Set<string>();

  constructor(
    private readonly dict: OptionDict,
    /** dotted path of this dictionary ('' at the top) */
    readonly prefix = '',
    /** true when leaves are keyval strings */
    readonly keyval = false,
  ) {}

  path(key: string): string {
    return this.prefix ? `${this.prefix}.${key}` : key;
  }

  has(key: string): boolean {
    return this.dict[key] !== undefined;
  }

  keys(): string[] {
    return Object.keys(this.dict).filter((k) => this.dict[k] !== undefined);
  }

  /** Takes a value as it is (children: a string reference, a dict, or null). */
  raw(key: string): unknown {
    this.taken.add(key);
    return this.dict[key];
  }

  private missing(key: string): never {
    throw new InvalidArgumentError(`Parameter '${this.path(key)}' is missing`);
  }

  private typeError(key: string, expected: string): never {
    throw new InvalidArgumentError(`Invalid parameter type for '${this.path(key)}', expected: ${expected}`);
  }

  string(key: string, required: true): string;
  string(key: string, required?: false): string | undefined;
  string(key: string, required = false): string | undefined {
    const v = this.raw(key);
    if (v === undefined) return required ? this.missing(key) : undefined;
    if (typeof v !== 'string') this.typeError(key, 'string');
    return v;
  }

  bool(key: string, dflt: boolean): boolean;
  bool(key: string): boolean | undefined;
  bool(key: string, dflt?: boolean): boolean | undefined {
    const v = this.raw(key);
    if (v === undefined) return dflt;
    if (typeof v === 'boolean') return v;
    if (typeof v === 'string' && this.keyval) {
      if (v === 'on' || v === 'yes' || v === 'true') return true;
      if (v === 'off' || v === 'no' || v === 'false') return false;
      throw new InvalidArgumentError(`Parameter '${this.path(key)}' expects 'on' or 'off'`);
    }
    return this.typeError(key, 'boolean');
  }

  private number(key: string, kind: 'integer' | 'uint64' | 'size', required: boolean, qapiInt = false): number | undefined {
    const v = this.raw(key);
    if (v === undefined) return required ? this.missing(key) : undefined;
    if (typeof v === 'number') {
      // QEMU's JSON types 1e3 as a double and 2^63 as a uint64: neither is an int64
      const literal = literalKind(this.dict, key);
      if (qapiInt && (literal !== undefined || !Number.isInteger(v))) this.typeError(key, 'integer');
      if (literal === 'double' || (literal && kind === 'integer')) this.typeError(key, kind === 'integer' ? 'integer' : kind);
      if (!Number.isInteger(v) || (kind !== 'integer' && v < 0)) this.typeError(key, kind === 'integer' ? 'integer' : kind);
      return v;
    }
    if (typeof v === 'string' && this.keyval) {
      const n = kind === 'size' ? parseSize(v) : /^-?\d+$/.test(v.trim()) ? Number(v) : null;
      if (n === null || !Number.isSafeInteger(n) || (kind !== 'integer' && n < 0)) {
        if (kind === 'size') {
          throw new InvalidArgumentError(
            `Parameter '${this.path(key)}' expects a non-negative number below 2^64`,
          );
        }
        throw new InvalidArgumentError(`Parameter '${this.path(key)}' expects ${kind === 'integer' ? 'an integer' : 'a non-negative integer'}`);
      }
      return n;
    }
    return this.typeError(key, kind === 'integer' ? 'integer' : kind);
  }

  int(key: string, required: true): number;
  int(key: string, required?: false): number | undefined;
  int(key: string, required = false): number | undefined {
    return this.number(key, 'integer', required);
  }

  uint(key: string, required: true): number;
  uint(key: string, required?: false): number | undefined;
  uint(key: string, required = false): number | undefined {
    return this.number(key, 'uint64', required);
  }

  size(key: string, required: true): number;
  size(key: string, required?: false): number | undefined;
  size(key: string, required = false): number | undefined {
    return this.number(key, 'size', required);
  }

  /** A size that QEMU's schema declares 'int' (null-co's size): JSON literals must be int64. */
  intSize(key: string): number | undefined {
    return this.number(key, 'size', false, true);
  }

  enumOf<T extends string>(key: string, values: readonly T[], required: true): T;
  enumOf<T extends string>(key: string, values: readonly T[], required?: false): T | undefined;
  enumOf<T extends string>(key: string, values: readonly T[], required = false): T | undefined {
    const v = this.raw(key);
    if (v === undefined) return required ? this.missing(key) : undefined;
    if (typeof v !== 'string') this.typeError(key, 'string');
    if (!(values as readonly string[]).includes(v)) {
      throw new InvalidArgumentError(`Parameter '${this.path(key)}' does not accept value '${v}'`);
    }
    return v as T;
  }

  /** A nested dictionary (e.g. nbd's `server`), or undefined when absent. */
  sub(key: string, required: true): OptionReader;
  sub(key: string, required?: false): OptionReader | undefined;
  sub(key: string, required = false): OptionReader | undefined {
    const v = this.raw(key);
    if (v === undefined) return required ? this.missing(key) : undefined;
    if (!isDict(v)) this.typeError(key, 'object');
    return new OptionReader(v, this.path(key), this.keyval);
  }

  /** Rejects whatever option was not taken. Call once a driver has read its options. */
  done(): void {
    for (const k of Object.keys(this.dict)) {
      if (this.dict[k] !== undefined && !this.taken.has(k)) {
        throw new InvalidArgumentError(`Parameter '${this.path(k)}' is unexpected`);
      }
    }
  }
}
