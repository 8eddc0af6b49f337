// `lockstep img info` and `lockstep img map`: what an image is and where its data lives,
// in qemu-img's human and JSON forms.

import type { BlockNode } from '../../block/node.js';
import { allocatedFileSize, type Io } from './common.js';

/** qemu's size_to_str: three significant digits, binary units ("1.5 MiB", "196 KiB", "512 B"). */
export function sizeToStr(value: number): string {
  const units = ['', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei'];
  let i = 0;
  // a value moves to the next unit from 1000 of the current one (frexp of value * 1.024)
  while (i < units.length - 1 && value / 2 ** (10 * i) >= 1000) i++;
  let text = (value / 2 ** (10 * i)).toPrecision(3);
  if (text.includes('.') && !text.includes('e')) text = text.replace(/0+$/, '').replace(/\.$/, '');
  return `${text} ${units[i]}B`;
}

/** Format-specific fields of qcow2 in qemu's order; kebab names as in the JSON. */
const QCOW2_SPECIFIC = ['compat', 'compression-type', 'lazy-refcounts', 'refcount-bits', 'corrupt', 'extended-l2'];

export interface ImageInfo {
  filename: string;
  format: string;
  virtualSize: number;
  actualSize?: number;
  clusterSize?: number;
  backingFilename?: string;
  fullBackingFilename?: string;
  backingFormat?: string;
  dirty: boolean;
  formatSpecific?: Record<string, unknown>;
}

/** The node a format node stores its data in (its `file`), for "disk size". */
function hostFilename(node: BlockNode): string {
  return node.file?.filename ?? node.filename;
}

export async function imageInfo(node: BlockNode, filename: string): Promise<ImageInfo> {
  const info = node.impl.info?.() ?? {};
  const r: ImageInfo = {
    filename,
    format: node.driver.name,
    virtualSize: node.getLength(),
    dirty: info['dirty-flag'] === true,
  };
  const actual = await allocatedFileSize(hostFilename(node));
  if (actual !== undefined) r.actualSize = actual;
  if (typeof info['cluster-size'] === 'number') r.clusterSize = info['cluster-size'];
  if (typeof info['backing-filename'] === 'string') {
    r.backingFilename = info['backing-filename'];
    const b = node.backing;
    r.fullBackingFilename = b ? hostFilename(b) : info['backing-filename'];
  }
  if (typeof info['backing-filename-format'] === 'string') r.backingFormat = info['backing-filename-format'];
  if (node.driver.name === 'qcow2') {
    const data: Record<string, unknown> = {};
    for (const k of QCOW2_SPECIFIC) if (info[k] !== undefined) data[k] = info[k];
    if (Object.keys(data).length) r.formatSpecific = data;
  }
  return r;
}

export function infoHuman(i: ImageInfo): string {
  let s = `image: ${i.filename}\nfile format: ${i.format}\nvirtual size: ${sizeToStr(i.virtualSize)} (${i.virtualSize} bytes)\n`;
  s += `disk size: ${i.actualSize === undefined ? 'unavailable' : sizeToStr(i.actualSize)}\n`;
  if (i.clusterSize !== undefined) s += `cluster_size: ${i.clusterSize}\n`;
  if (i.backingFilename !== undefined) {
    s += `backing file: ${i.backingFilename}`;
    if (i.fullBackingFilename !== undefined && i.fullBackingFilename !== i.backingFilename) s += ` (actual path: ${i.fullBackingFilename})`;
    s += '\n';
  }
  if (i.backingFormat !== undefined) s += `backing file format: ${i.backingFormat}\n`;
  if (i.dirty) s += 'cleanly shut down: no\n';
  if (i.formatSpecific) {
    s += 'Format specific information:\n';
    for (const [k, v] of Object.entries(i.formatSpecific)) s += `    ${k.replace(/-/g, ' ')}: ${String(v)}\n`;
  }
  return s;
}

/** The JSON object, keys in the order qemu-img 7.2 prints them. */
export function infoJson(i: ImageInfo): Record<string, unknown> {
  const o: Record<string, unknown> = {};
  if (i.backingFormat !== undefined) o['backing-filename-format'] = i.backingFormat;
  o['virtual-size'] = i.virtualSize;
  o.filename = i.filename;
  if (i.clusterSize !== undefined) o['cluster-size'] = i.clusterSize;
  o.format = i.format;
  if (i.actualSize !== undefined) o['actual-size'] = i.actualSize;
  if (i.formatSpecific) o['format-specific'] = { type: i.format, data: i.formatSpecific };
  if (i.backingFilename !== undefined) {
    o['full-backing-filename'] = i.fullBackingFilename;
    o['backing-filename'] = i.backingFilename;
  }
  o['dirty-flag'] = i.dirty;
  return o;
}

export async function runInfo(io: Io, node: BlockNode, filename: string, json: boolean, chain: boolean): Promise<number> {
  const infos: ImageInfo[] = [await imageInfo(node, filename)];
  if (chain) {
    for (let b = node.backing; b; b = b.backing) {
      const prev = infos[infos.length - 1]!;
      infos.push(await imageInfo(b, prev.backingFilename ?? hostFilename(b)));
    }
  }
  if (json) {
    const value = chain ? infos.map(infoJson) : infoJson(infos[0]!);
    io.out(JSON.stringify(value, null, 4) + '\n');
  } else {
    io.out(infos.map(infoHuman).join('\n'));
  }
  return 0;
}

// ---- map ------------------------------------------------------------------------------------

export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
  /** the host file holding the data at offset */
  filename?: string;
}

/**
 * The status of the chain at `offset`: the first layer that defines the bytes (its depth),
 * or the bottom layer's "not present, reads as zeroes".
 */
async function chainStatus(top: BlockNode, offset: number, length: number): Promise<MapEntry> {
  let node: BlockNode = top;
  let depth = 0;
  let len = length;
  for (;;) {
    const s = await node.blockStatus(offset, len);
    len = s.length;
    if (s.allocated) {
      const e: MapEntry = { start: offset, length: len, depth, present: true, zero: s.zero, data: s.data };
      if (s.hostOffset !== undefined) {
        e.offset = s.hostOffset;
        e.filename = s.file?.filename ?? hostFilename(node);
      }
      return e;
    }
    const b = node.backing;
    if (!b || offset >= b.getLength()) {
      return { start: offset, length: len, depth: b ? depth + 1 : depth, present: false, zero: true, data: false };
    }
    len = Math.min(len, b.getLength() - offset);
    node = b;
    depth++;
  }
}

function mergeable(a: MapEntry, b: MapEntry): boolean {
  if (a.depth !== b.depth || a.present !== b.present || a.zero !== b.zero || a.data !== b.data) return false;
  if (a.filename !== b.filename) return false;
  if ((a.offset === undefined) !== (b.offset === undefined)) return false;
  return a.offset === undefined || a.offset + a.length === b.offset;
}

export async function mapEntries(node: BlockNode, start = 0, maxLength = Infinity): Promise<MapEntry[]> {
  const end = Math.min(node.getLength(), start + maxLength);
  const entries: MapEntry[] = [];
  for (let pos = start; pos < end; ) {
    const e = await chainStatus(node, pos, end - pos);
    const last = entries[entries.length - 1];
    if (last && mergeable(last, e)) last.length += e.length;
    else entries.push(e);
    pos += e.length;
  }
  return entries;
}

function hex(n: number): string {
  return n === 0 ? '0' : `0x${n.toString(16)}`;
}

export function mapHuman(entries: MapEntry[]): string {
  let s = `${'Offset'.padEnd(16)}${'Length'.padEnd(16)}${'Mapped to'.padEnd(16)}File\n`;
  for (const e of entries) {
    if (e.data && e.offset !== undefined) s += `${hex(e.start).padEnd(16)}${hex(e.length).padEnd(16)}${hex(e.offset).padEnd(16)}${e.filename ?? ''}\n`;
  }
  return s;
}

export function mapJson(entries: MapEntry[]): string {
  const lines = entries.map((e) => {
    let s = `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}`;
    if (e.offset !== undefined) s += `, "offset": ${e.offset}`;
    return s + '}';
  });
  return `[${lines.join(',\n')}]\n`;
}
