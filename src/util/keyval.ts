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
// Plus the plain-filename path of qemu-img / qemu-io: `-f FMT FILE`, or probing the format.

import { open as fsOpen } from 'node:fs/promises';
import { InvalidArgumentError, strerror } from '../errors.js';
import { isDict, type OptionDict } from '../block/options.js';

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

/** The qcow2 header magic, "QFI\xfb". */
const QCOW2_MAGIC = Buffer.from([0x51, 0x46, 0x49, 0xfb]);

/** Format of a host file from its first bytes: qcow2 by its magic, else raw. */
export function probeFormatFromHeader(header: Buffer): 'qcow2' | 'raw' {
  return header.length >= 4 && header.subarray(0, 4).equals(QCOW2_MAGIC) ? 'qcow2' : 'raw';
}

/**
 * Reads the start of `filename` and guesses its format. A missing or unreadable file
 * gives QEMU's "Could not open 'x': <strerror>".
 */
export async function probeFormat(filename: string): Promise<'qcow2' | 'raw'> {
  let fh;
  try {
    fh = await fsOpen(filename, 'r');
  } catch (e) {
    throw new InvalidArgumentError(`Could not open '${filename}': ${strerror(e)}`);
  }
  try {
    const buf = Buffer.alloc(4);
    const { bytesRead } = await fh.read(buf, 0, 4, 0);
    return probeFormatFromHeader(buf.subarray(0, bytesRead));
  } catch (e) {
    throw new InvalidArgumentError(`Could not read '${filename}': ${strerror(e)}`);
  } finally {
    await fh.close();
  }
}

/** The default NBD port (IANA). */
const NBD_DEFAULT_PORT = '10809';

/**
 * The nbd protocol options for QEMU's NBD filenames, or null when `filename` is not one:
 * `nbd://host[:port][/export]`, `nbd+tcp://...`, `nbd+unix:///export?socket=PATH`, and the
 * legacy `nbd:host:port[:exportname=NAME]` / `nbd:unix:PATH[:exportname=NAME]`. The port
 * is a string, as in QEMU's SocketAddress. TLS URIs (nbds://) need a tls-creds object and
 * are refused here.
 */
export function nbdFilenameOptions(filename: string): OptionDict | null {
  const scheme = /^([a-z+]+):/.exec(filename)?.[1];
  if (scheme === undefined || !scheme.startsWith('nbd')) return null;
  if (scheme === 'nbds' || scheme.startsWith('nbds+')) {
    throw new InvalidArgumentError(`NBD over TLS (${scheme}://) needs --image-opts with tls-creds`);
  }
  if (filename.startsWith('nbd:') && !filename.startsWith('nbd://')) {
    // legacy syntax
    const rest = filename.slice(4);
    const m = /^(?:unix:(?<path>[^:]+)|(?<host>\[[^\]]+\]|[^:]+):(?<port>\d+))(?::exportname=(?<name>.*))?$/.exec(rest);
    if (!m?.groups) throw new InvalidArgumentError(`Invalid NBD filename '${filename}'`);
    const g = m.groups;
    const server: OptionDict = g.path !== undefined ? { type: 'unix', path: g.path } : { type: 'inet', host: g.host!.replace(/^\[|\]$/g, ''), port: g.port! };
    return { driver: 'nbd', server, export: g.name ?? '' };
  }
  let url: URL;
  try {
    url = new URL(filename);
  } catch {
    throw new InvalidArgumentError(`Invalid NBD URI '${filename}'`);
  }
  const exportName = decodeURIComponent(url.pathname.replace(/^\//, ''));
  if (scheme === 'nbd+unix') {
    const socket = url.searchParams.get('socket');
    if (!socket) throw new InvalidArgumentError(`NBD URI '${filename}': nbd+unix needs ?socket=PATH`);
    if (url.host !== '') throw new InvalidArgumentError(`NBD URI '${filename}': nbd+unix takes no host`);
    return { driver: 'nbd', server: { type: 'unix', path: socket }, export: exportName };
  }
  if (scheme !== 'nbd' && scheme !== 'nbd+tcp') throw new InvalidArgumentError(`Unknown NBD URI scheme '${scheme}'`);
  if (url.hostname === '') throw new InvalidArgumentError(`NBD URI '${filename}' names no host`);
  if ([...url.searchParams.keys()].length > 0) throw new InvalidArgumentError(`NBD URI '${filename}': unexpected query`);
  const host = url.hostname.replace(/^\[|\]$/g, '');
  return { driver: 'nbd', server: { type: 'inet', host, port: url.port || NBD_DEFAULT_PORT }, export: exportName };
}

/** The dict for a plain filename with a known format (qemu-img -f FMT FILE). */
export function filenameOptions(filename: string, format: string): OptionDict {
  if (format === 'file') return { driver: 'file', filename };
  return { driver: format, file: { driver: 'file', filename } };
}

export interface ImageSpec {
  dict: OptionDict;
  keyval: boolean;
  /** the format was guessed from the file's content (qemu-io warns for raw) */
  probed: boolean;
}

/**
 * Fills in what QEMU infers for image options given on the command line: a `file` child
 * with a filename and no driver is a host file; without a top-level driver the format is
 * probed from that file (or from `filename` itself). `format` (-f) overrides the driver.
 */
export async function completeImageOptions(dict: OptionDict, format?: string): Promise<{ dict: OptionDict; probed: boolean }> {
  const file = dict.file;
  if (isDict(file) && file.driver === undefined && file.filename !== undefined) file.driver = 'file';
  if (format !== undefined) {
    dict.driver = format;
    return { dict, probed: false };
  }
  if (dict.driver !== undefined) return { dict, probed: false };
  let probeName: unknown;
  if (isDict(file) && file.driver === 'file') probeName = file.filename;
  else if (file === undefined && dict.filename !== undefined) {
    // a bare top-level filename: the host file becomes the format's child
    probeName = dict.filename;
    const { filename, ...rest } = dict;
    for (const k of Object.keys(dict)) delete dict[k];
    Object.assign(dict, rest, { file: { driver: 'file', filename } });
  }
  if (typeof probeName !== 'string') throw new InvalidArgumentError('Must specify either driver or file');
  dict.driver = await probeFormat(probeName);
  return { dict, probed: true };
}

/**
 * What qemu-img / qemu-io open for a FILE argument: `json:{...}` (with `-f` overriding its
 * driver, as in QEMU), an NBD URI (format -f, else raw), or a host file with the format
 * from `-f` or, without it, probed.
 */
export async function imageOptions(filename: string, format?: string): Promise<ImageSpec> {
  if (isJsonFilename(filename)) {
    const done = await completeImageOptions(parseJsonOptions(filename.slice(5)), format);
    return { dict: done.dict, keyval: false, probed: done.probed };
  }
  const nbd = nbdFilenameOptions(filename);
  if (nbd) {
    // no probing through the network: the format is -f, else raw
    return { dict: { driver: format ?? 'raw', file: nbd }, keyval: false, probed: false };
  }
  if (format !== undefined) return { dict: filenameOptions(filename, format), keyval: false, probed: false };
  const probed = await probeFormat(filename);
  return { dict: filenameOptions(filename, probed), keyval: false, probed: true };
}
