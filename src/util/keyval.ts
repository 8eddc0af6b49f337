// QEMU's two spellings of block options, parsed into the nested dictionary BlockGraph.open
// takes:
// - dotted keyval (`driver=raw,file.driver=file,file.filename=a.img`): every leaf a string,
//   open with `{ keyval: true }`. Syntax and error wording follow QEMU's keyval parser
//   (-blockdev, --export): `,,` escapes a comma, the last of duplicate keys wins, an optional
//   implied first key (`nbd,id=e0` -> `type=nbd`), numeric fragments (`children.0.driver`)
//   are array members; arrays stay dicts with canonical numeric keys ("0", "1", ...), checked
//   for gaps and for mixing with named members.
// - JSON (`{"driver": ...}` or a `json:{...}` filename): typed leaves, open with
//   `{ keyval: false }`. In json: filenames, dotted keys are expanded as QEMU flattens them.
// The file-name forms of qemu-img and qemu-io (probing, NBD URIs) are src/cli/image-spec.ts's.

import { InvalidArgumentError } from '../errors.js';
import { isDict, type OptionDict } from './dict.js';

/** Longest key fragment QEMU accepts (its buffer is 128 bytes with the terminator). */
const MAX_FRAGMENT = 127;

export interface KeyvalParseOptions {
  /** key implied when the first element has no '=' (`--export nbd,...` -> type=nbd) */
  impliedKey?: string;
}

/** Parsed options and the mode BlockGraph.open needs for them. */
export interface ParsedOptions {
  dict: OptionDict;
  /** true: keyval strings; false: typed JSON */
  keyval: boolean;
}

/** A QAPI name at the start of `s` (letter, then letters, digits, '-', '_'); its length. */
function qapiNameLength(s: string): number {
  const m = /^[A-Za-z][A-Za-z0-9_-]*/.exec(s);
  return m ? m[0].length : 0;
}

/** Leading decimal digits at the start of `s`; their length. */
function indexLength(s: string): number {
  const m = /^[0-9]+/.exec(s);
  return m ? m[0].length : 0;
}

type Node = OptionDict;

/**
 * Places `value` (a string leaf) or a dict (value undefined) at `cur[key]`, reporting a
 * clash between a leaf and a dict as QEMU does ("Parameters 'a.*' used inconsistently").
 */
function put(cur: Node, key: string, value: string | undefined, clashPath: string): unknown {
  const old = cur[key];
  if (old !== undefined) {
    const oldIsDict = isDict(old);
    if (oldIsDict !== (value === undefined)) {
      throw new InvalidArgumentError(`Parameters '${clashPath}.*' used inconsistently`);
    }
    if (value === undefined) return old;
  }
  const nv = value ?? {};
  cur[key] = nv;
  return nv;
}

/** Parses one `key=value` starting at `pos`; returns the position after it. */
function parseOne(text: string, pos: number, root: Node, impliedKey: string | undefined): number {
  let len = 0;
  while (pos + len < text.length && text[pos + len] !== '=' && text[pos + len] !== ',') len++;
  let key = text.slice(pos, pos + len);
  let implied = false;
  if (impliedKey !== undefined && len > 0 && text[pos + len] !== '=') {
    key = impliedKey;
    implied = true;
  }

  // Walk the key's fragments, creating dicts on the way.
  let cur = root;
  let fragStart = 0;
  let leafKey = '';
  for (;;) {
    const rest = key.slice(fragStart);
    const n = fragStart > 0 && indexLength(rest) > 0 ? indexLength(rest) : qapiNameLength(rest);
    if (n === 0 || (fragStart + n < key.length && key[fragStart + n] !== '.')) {
      throw new InvalidArgumentError(`Invalid parameter '${key}'`);
    }
    if (n > MAX_FRAGMENT) {
      const whole = fragStart === 0 && n === key.length;
      throw new InvalidArgumentError(`Parameter${whole ? '' : ' fragment'} '${rest.slice(0, n)}' is too long`);
    }
    if (fragStart > 0) cur = put(cur, leafKey, undefined, key.slice(0, fragStart - 1)) as Node;
    leafKey = rest.slice(0, n);
    fragStart += n;
    if (key[fragStart] !== '.') break;
    fragStart++;
  }

  let s: number;
  if (implied) {
    s = pos;
  } else {
    if (text[pos + len] !== '=') throw new InvalidArgumentError(`Expected '=' after parameter '${key}'`);
    s = pos + len + 1;
  }
  // The value runs to the next single ',' (',,' is a literal comma).
  let value = '';
  while (s < text.length) {
    const c = text[s]!;
    if (c === ',') {
      s++;
      if (text[s] !== ',') break;
    }
    value += text[s]!;
    s++;
  }
  put(cur, leafKey, value, key);
  return s;
}

/**
 * Checks array-like dicts (all keys numeric): no gaps, no mixing with named members, and
 * canonical keys ("01" is member 1). Keeps them as dicts.
 */
function checkArrays(cur: Node, path: string): Node {
  let hasIndex = false;
  let hasMember = false;
  for (const [k, v] of Object.entries(cur)) {
    if (/^[0-9]/.test(k)) hasIndex = true;
    else hasMember = true;
    if (isDict(v)) cur[k] = checkArrays(v, `${path}${k}.`);
  }
  if (hasIndex && hasMember) throw new InvalidArgumentError(`Parameters '${path}*' used inconsistently`);
  if (!hasIndex) return cur;
  const byIndex = new Map<number, unknown>();
  let maxIndex = -1;
  for (const [k, v] of Object.entries(cur)) {
    const idx = Math.min(Number(k), 0x7fffffff);
    byIndex.set(idx, v); // insertion order: a later spelling of the same index wins
    maxIndex = Math.max(maxIndex, idx);
  }
  const out: Node = {};
  for (let i = 0; i <= maxIndex; i++) {
    if (!byIndex.has(i)) throw new InvalidArgumentError(`Parameter '${path}${i}' missing`);
    out[String(i)] = byIndex.get(i);
  }
  return out;
}

/**
 * Parses QEMU's KEY=VALUE,... syntax into a nested dict of string leaves. Throws
 * InvalidArgumentError with QEMU's wording on malformed input. The second argument is the
 * options, or the implied key itself (`parseKeyval('nbd,id=e0', 'type')`).
 */
export function parseKeyval(text: string, opts: KeyvalParseOptions | string = {}): OptionDict {
  const root: Node = {};
  let pos = 0;
  let implied = typeof opts === 'string' ? opts : opts.impliedKey;
  while (pos < text.length) {
    pos = parseOne(text, pos, root, implied);
    implied = undefined;
  }
  return checkArrays(root, '');
}

/**
 * Expands dotted keys of a JSON options object (`{"file.driver": "file"}`) into nested
 * dicts, merging with nested members of the same name, as QEMU does for json: filenames.
 */
export function expandDottedKeys(dict: OptionDict, path = ''): OptionDict {
  const out: OptionDict = {};
  const full = (k: string): string => (path ? `${path}.${k}` : k);
  const place = (key: string, value: unknown): void => {
    const dot = key.indexOf('.');
    if (dot < 0) {
      const old = out[key];
      if (old === undefined || (!isDict(old) && !isDict(value))) {
        out[key] = isDict(value) ? expandDottedKeys(value, full(key)) : value;
      } else if (isDict(old) && isDict(value)) mergeInto(old, expandDottedKeys(value, full(key)), full(key));
      else conflict(full(key), old, value);
      return;
    }
    const head = key.slice(0, dot);
    const tail = key.slice(dot + 1);
    if (head === '' || tail === '') throw new InvalidArgumentError(`Invalid parameter '${full(key)}'`);
    let sub = out[head];
    if (sub === undefined) out[head] = sub = {};
    if (!isDict(sub)) conflict(full(head), sub, {});
    const expanded = expandDottedKeys({ [tail]: value }, full(head));
    mergeInto(sub, expanded, full(head));
  };
  for (const [k, v] of Object.entries(dict)) place(k, v);
  return out;
}

function conflict(path: string, a: unknown, b: unknown): never {
  if (typeof a === 'string' || typeof b === 'string') {
    // a node-name reference plus inline options for the same child
    throw new InvalidArgumentError('Cannot reference an existing block device with additional options or a new filename');
  }
  throw new InvalidArgumentError(`Parameters '${path}.*' used inconsistently`);
}

function mergeInto(target: OptionDict, src: OptionDict, path: string): void {
  for (const [k, v] of Object.entries(src)) {
    const old = target[k];
    if (old === undefined) target[k] = v;
    else if (isDict(old) && isDict(v)) mergeInto(old, v, `${path}.${k}`);
    else if (!isDict(old) && !isDict(v)) target[k] = v; // the later spelling wins
    else conflict(`${path}.${k}`, old, v);
  }
}

/** Parses a JSON object of options (typed leaves); dotted keys are expanded. */
export function parseJsonOptions(text: string): OptionDict {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (e) {
    throw new InvalidArgumentError(`Could not parse the JSON options: ${(e as Error).message}`);
  }
  if (!isDict(v)) throw new InvalidArgumentError('Invalid JSON object given');
  return expandDottedKeys(v);
}

/** true for QEMU's `json:{...}` pseudo-filenames. */
export function isJsonFilename(filename: string): boolean {
  return filename.startsWith('json:');
}

/**
 * An option string in either spelling: JSON when it starts with '{' (as -blockdev and
 * --blockdev accept), a `json:{...}` filename, else keyval.
 */
export function parseOptionString(text: string, opts: KeyvalParseOptions = {}): ParsedOptions {
  if (isJsonFilename(text)) return { dict: parseJsonOptions(text.slice(5)), keyval: false };
  if (text.trimStart().startsWith('{')) return { dict: parseJsonOptions(text), keyval: false };
  return { dict: parseKeyval(text, opts), keyval: true };
}
