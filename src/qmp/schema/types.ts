// A small QAPI: argument schemas written like QAPI's JSON (`'*speed': 'int'` is optional),
// one validator that answers with QEMU 7.2's exact messages, and a converter from
// `key=value` strings (lockstep qmp's command line) to typed JSON following the schema.
//
// QEMU's input visitor names a parameter by its full path ("addr.data.host",
// "options[0].file") in missing/unexpected/type errors, but an enum value error names only
// the member ("Parameter 'type' does not accept value 'inetx'"): both are reproduced.

import { InvalidArgumentError } from '../../errors.js';
import { literalKind, type LiteralKind } from '../../util/json-literals.js';

export type ScalarType = 'str' | 'bool' | 'int' | 'uint64' | 'size' | 'number' | 'any' | 'null';

export type TypeSpec =
  | ScalarType
  | { readonly enum: readonly string[] }
  | { readonly struct: Fields }
  | { readonly list: TypeSpec }
  /** a flat union: common members, a discriminator member (an enum), members per branch */
  | { readonly union: { readonly base: Fields; readonly discriminator: string; readonly branches: Readonly<Record<string, Fields>> } }
  /** an alternate: the first branch whose JSON type matches wins (BlockdevRef: str | struct) */
  | { readonly alternate: readonly TypeSpec[]; readonly name: string }
  /** an object taken as it is; the handler validates it (blockdev-add through graph.open) */
  | { readonly dict: true };

/** Member name -> type; a leading '*' marks an optional member, as in QAPI. */
export type Fields = Readonly<Record<string, TypeSpec>>;

// The helpers keep literal types, so that ArgsOf can derive a handler's argument type.
export const enumOf = <const V extends readonly string[]>(...values: V): { readonly enum: V } => ({ enum: values });
export const struct = <const F extends Fields>(fields: F): { readonly struct: F } => ({ struct: fields });
export const listOf = <const T extends TypeSpec>(t: T): { readonly list: T } => ({ list: t });
export const ANY_DICT = { dict: true } as const satisfies TypeSpec;

/** The value a member of type `T` holds once checkValue has accepted it. */
export type ValueOf<T> = T extends 'str'
  ? string
  : T extends 'bool'
    ? boolean
    : T extends 'int' | 'uint64' | 'size' | 'number'
      ? number
      : T extends 'null'
        ? null
        : T extends { readonly enum: readonly (infer V)[] }
          ? V
          : T extends { readonly struct: infer F }
            ? ArgsOf<F>
            : T extends { readonly list: infer E }
              ? Array<ValueOf<E>>
              : T extends { readonly union: infer U }
                ? UnionValue<U>
                : T extends { readonly dict: true }
                  ? Record<string, unknown>
                  : unknown;

/** A flat union's value: one object type per branch, told apart by the discriminator. */
type UnionValue<U> = U extends { readonly base: infer B; readonly discriminator: infer D extends string; readonly branches: infer Br }
  ? { [K in keyof Br & string]: Omit<ArgsOf<B>, D> & { [P in D]: K } & ArgsOf<Br[K]> }[keyof Br & string]
  : Record<string, unknown>;

/**
 * A command's arguments as its handler receives them, derived from the schema the validator
 * checked them against: `{device: 'str', '*speed': 'int'}` -> `{device: string; speed?: number}`.
 * A flat union is one object type per branch; free dictionaries stay `Record<string, unknown>`.
 */
export type ArgsOf<S> = S extends { readonly union: infer U }
  ? UnionValue<U>
  : S extends { readonly dict: true } | { readonly alternate: unknown }
    ? Record<string, unknown>
    : S extends { readonly struct: infer F }
    ? ArgsOf<F>
    : { [K in keyof S as K extends `*${string}` ? never : K]: ValueOf<S[K]> } & {
        [K in keyof S as K extends `*${infer N}` ? N : never]?: ValueOf<S[K]>;
      };

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function fail(msg: string): never {
  throw new InvalidArgumentError(msg);
}

function typeName(t: TypeSpec): string {
  if (typeof t === 'string') {
    switch (t) {
      case 'str':
        return 'string';
      case 'bool':
        return 'boolean';
      case 'int':
        return 'integer';
      default:
        return t;
    }
  }
  if ('enum' in t) return 'string';
  if ('list' in t) return 'array';
  if ('alternate' in t) return t.name;
  return 'object';
}

function join(path: string, key: string): string {
  return path ? `${path}.${key}` : key;
}

/** Splits `{'*a': T, b: U}` into [name, type, optional] triples. */
export function members(fields: Fields): Array<[string, TypeSpec, boolean]> {
  return Object.entries(fields).map(([k, t]) => (k.startsWith('*') ? [k.slice(1), t, true] : [k, t, false]));
}

/**
 * Checks `value` against `t` and returns it (unchanged: the JSON is already typed). `path` is
 * the full name used in messages, `leaf` the member name used for enum errors.
 */
export function checkValue(t: TypeSpec, value: unknown, path: string, leaf: string, literal?: LiteralKind): unknown {
  const typeErr = (): never => fail(`Invalid parameter type for '${path}', expected: ${typeName(t)}`);
  if (typeof t === 'string') {
    switch (t) {
      case 'any':
        return value;
      case 'null':
        return value === null ? value : typeErr();
      case 'str':
        return typeof value === 'string' ? value : typeErr();
      case 'bool':
        return typeof value === 'boolean' ? value : typeErr();
      case 'number':
        return typeof value === 'number' ? value : typeErr();
      case 'int':
        // a literal QEMU parses as a double or a uint64 is no int64 (1e3, 2^63)
        return typeof value === 'number' && Number.isInteger(value) && literal === undefined ? value : typeErr();
      case 'uint64':
      case 'size':
        if (literal === 'double') return fail(`Invalid parameter type for '${path}', expected: ${t}`);
        // QEMU accepts any JSON integer here (negative ones wrap); lockstep refuses them.
        if (typeof value === 'number' && Number.isInteger(value) && value >= 0) return value;
        return fail(`Parameter '${path}' expects ${t}`);
    }
  }
  if ('enum' in t) {
    if (typeof value !== 'string') return typeErr();
    if (!t.enum.includes(value)) fail(`Parameter '${leaf}' does not accept value '${value}'`);
    return value;
  }
  if ('list' in t) {
    if (!Array.isArray(value)) return typeErr();
    value.forEach((v, i) => checkValue(t.list, v, `${path}[${i}]`, `${leaf}[${i}]`, literalKind(value, i)));
    return value;
  }
  if ('alternate' in t) {
    for (const branch of t.alternate) {
      if (matchesJsonType(branch, value)) return checkValue(branch, value, path, leaf);
    }
    return typeErr();
  }
  if ('dict' in t) return isObject(value) ? value : typeErr();
  if (!isObject(value)) return typeErr();
  if ('struct' in t) return checkFields(t.struct, value, path);
  return checkUnion(t.union, value, path);
}

function matchesJsonType(t: TypeSpec, v: unknown): boolean {
  if (typeof t === 'string') {
    switch (t) {
      case 'str':
        return typeof v === 'string';
      case 'bool':
        return typeof v === 'boolean';
      case 'null':
        return v === null;
      case 'any':
        return true;
      default:
        return typeof v === 'number';
    }
  }
  if ('enum' in t) return typeof v === 'string';
  if ('list' in t) return Array.isArray(v);
  if ('alternate' in t) return t.alternate.some((b) => matchesJsonType(b, v));
  return isObject(v);
}

/** Checks the members of an object: every required one present, no stranger. */
export function checkFields(fields: Fields, obj: Record<string, unknown>, path: string, extra: Fields = {}): Record<string, unknown> {
  const all = [...members(fields), ...members(extra)];
  for (const [name, t, optional] of all) {
    const v = obj[name];
    if (v === undefined) {
      if (!optional) fail(`Parameter '${join(path, name)}' is missing`);
      continue;
    }
    checkValue(t, v, join(path, name), name, literalKind(obj, name));
  }
  const known = new Set(all.map(([n]) => n));
  for (const k of Object.keys(obj)) if (!known.has(k)) fail(`Parameter '${join(path, k)}' is unexpected`);
  return obj;
}

function checkUnion(
  u: { readonly base: Fields; readonly discriminator: string; readonly branches: Readonly<Record<string, Fields>> },
  obj: Record<string, unknown>,
  path: string,
): Record<string, unknown> {
  // The base (with the discriminator) is visited first, as QEMU's generated visitors do.
  const disc = obj[u.discriminator];
  const baseOnly: Record<string, unknown> = {};
  for (const [name] of members(u.base)) if (obj[name] !== undefined) baseOnly[name] = obj[name];
  if (disc === undefined) fail(`Parameter '${join(path, u.discriminator)}' is missing`);
  checkValue({ enum: Object.keys(u.branches) }, disc, join(path, u.discriminator), u.discriminator);
  const branch = u.branches[disc as string] ?? {};
  return checkFields(u.base, obj, path, branch);
}

/** Validates a command's `arguments` object against its member table. */
export function validateArguments(fields: Fields | TypeSpec, args: Record<string, unknown>): Record<string, unknown> {
  if (isFieldsTable(fields)) return checkFields(fields, args, '');
  checkValue(fields, args, '', '');
  return args;
}

function isFieldsTable(f: Fields | TypeSpec): f is Fields {
  return typeof f === 'object' && !('struct' in f) && !('union' in f) && !('dict' in f) && !('list' in f) && !('enum' in f) && !('alternate' in f);
}

// ---- key=value strings -> typed JSON (lockstep qmp's command line) -------------------------

/** Builds a nested object from dotted keys: `addr.data.port=1` -> {addr:{data:{port:'1'}}}. */
export function nestDotted(pairs: Array<[string, string]>): Record<string, unknown> {
  const root: Record<string, unknown> = {};
  for (const [key, value] of pairs) {
    const parts = key.split('.');
    if (parts.some((p) => p === '')) fail(`Invalid parameter '${key}'`);
    let obj = root;
    for (let i = 0; i < parts.length - 1; i++) {
      const p = parts[i]!;
      const next = obj[p];
      if (next === undefined) obj = obj[p] = {} as Record<string, unknown>;
      else if (isObject(next)) obj = next;
      else fail(`Parameter '${parts.slice(0, i + 1).join('.')}' used inconsistently`);
    }
    const last = parts[parts.length - 1]!;
    if (isObject(obj[last])) fail(`Parameter '${key}' used inconsistently`);
    obj[last] = value;
  }
  return root;
}

const TRUE_WORDS = new Set(['true', 'on', 'yes']);
const FALSE_WORDS = new Set(['false', 'off', 'no']);

/**
 * Converts string leaves to the types the schema asks for. Objects whose keys are 0, 1, ...
 * become arrays where the schema wants a list. Free-form parts (`any`, dicts) get a best guess:
 * true/false become booleans and decimal integers numbers; give JSON for anything else.
 */
export function coerceStrings(spec: TypeSpec | Fields, value: unknown, path = ''): unknown {
  const t: TypeSpec = typeof spec === 'object' && isFieldsTable(spec) ? { struct: spec } : (spec as TypeSpec);
  if (typeof value !== 'string' && !isObject(value)) return value;
  if (typeof t === 'string') {
    if (typeof value !== 'string') return t === 'any' ? guessTypes(value) : value;
    switch (t) {
      case 'bool':
        if (TRUE_WORDS.has(value)) return true;
        if (FALSE_WORDS.has(value)) return false;
        return fail(`Parameter '${path}' expects 'on' or 'off'`);
      case 'int':
      case 'uint64':
      case 'size':
      case 'number': {
        const n = Number(value);
        if (value.trim() === '' || !Number.isFinite(n)) return fail(`Parameter '${path}' expects a number`);
        return n;
      }
      case 'null':
        return value === 'null' ? null : value;
      case 'any':
        return guessTypes(value);
      default:
        return value;
    }
  }
  if ('list' in t) {
    if (!isObject(value)) return value;
    const keys = Object.keys(value);
    if (!keys.every((k, i) => k === String(i))) return value;
    const elem = t.list;
    return keys.map((k, i) => coerceStrings(elem, value[k], `${path}[${i}]`));
  }
  if ('alternate' in t) {
    if (typeof value === 'string') {
      const s = t.alternate.find((b) => typeof b === 'string' || 'enum' in b);
      return s ? coerceStrings(s, value, path) : value;
    }
    const o = t.alternate.find((b) => typeof b === 'object' && ('struct' in b || 'union' in b || 'dict' in b));
    return o ? coerceStrings(o, value, path) : value;
  }
  if ('dict' in t) return guessTypes(value);
  if (!isObject(value)) return value;
  let fields: Fields;
  if ('struct' in t) fields = t.struct;
  else if ('union' in t) {
    const disc = value[t.union.discriminator];
    fields = { ...t.union.base, ...(typeof disc === 'string' ? (t.union.branches[disc] ?? {}) : {}) };
  } else return value;
  const out: Record<string, unknown> = {};
  const table = new Map(members(fields).map(([n, ft]) => [n, ft]));
  for (const [k, v] of Object.entries(value)) {
    const ft = table.get(k);
    out[k] = ft ? coerceStrings(ft, v, join(path, k)) : v;
  }
  return out;
}

function guessTypes(v: unknown): unknown {
  if (typeof v === 'string') {
    if (v === 'true') return true;
    if (v === 'false') return false;
    if (/^-?(0|[1-9]\d{0,15})$/.test(v)) return Number(v);
    return v;
  }
  if (isObject(v)) {
    const keys = Object.keys(v);
    if (keys.length > 0 && keys.every((k, i) => k === String(i))) return keys.map((k) => guessTypes(v[k]));
    return Object.fromEntries(keys.map((k) => [k, guessTypes(v[k])]));
  }
  return v;
}
