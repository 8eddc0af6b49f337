// QEMU's NBD file names (qemu-img, qemu-io and drive-mirror targets): the NBD URI format of
// the NBD project's doc/uri.md and QEMU's legacy `nbd:` syntax, as options for the nbd driver.

import { InvalidArgumentError } from '../errors.js';
import type { OptionDict } from '../util/dict.js';

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
