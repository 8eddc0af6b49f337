// What qemu-img and qemu-io open for an image argument: a plain file name (format from -f or
// probed), a `json:{...}` file name, an NBD URI, or --image-opts options completed as QEMU
// completes them.

import { InvalidArgumentError } from '../errors.js';
import { probeFormat } from '../block/probe.js';
import { nbdFilenameOptions } from '../nbd/uri.js';
import { isDict, type OptionDict } from '../util/dict.js';
import { isJsonFilename, parseJsonOptions } from '../util/keyval.js';

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
