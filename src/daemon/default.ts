// `lockstep daemon --default` (what `npm start` runs): a 1 GiB sparse image under the data
// directory, exported writable as "disk0" on a Unix socket and on 127.0.0.1:10809, and a QMP
// monitor on a Unix socket. Existing files are reused, so data survives restarts.

import { existsSync, mkdirSync, openSync, closeSync, ftruncateSync } from 'node:fs';
import { resolve, join } from 'node:path';
import type { DaemonOptions } from './options.js';

export const DEFAULT_IMAGE_SIZE = 1024 ** 3;
export const DEFAULT_NBD_PORT = 10809;

export interface DefaultLayout {
  dataDir: string;
  image: string;
  format: 'qcow2' | 'raw';
  nbdSocket: string;
  qmpSocket: string;
  nbdPort: number;
}

/**
 * Creates the image if needed and adds the default items to `opts`. `createQcow2` is given
 * when the build has the qcow2 driver; the image is raw otherwise.
 */
export async function applyDefaults(
  opts: DaemonOptions,
  createQcow2: ((filename: string, size: number) => Promise<void>) | null,
): Promise<DefaultLayout> {
  const dataDir = resolve(opts.dataDir);
  mkdirSync(dataDir, { recursive: true });
  const format = createQcow2 ? 'qcow2' : 'raw';
  const image = join(dataDir, `disk0.${format}`);
  if (!existsSync(image)) {
    if (createQcow2) await createQcow2(image, DEFAULT_IMAGE_SIZE);
    else {
      const fd = openSync(image, 'w');
      try {
        ftruncateSync(fd, DEFAULT_IMAGE_SIZE);
      } finally {
        closeSync(fd);
      }
    }
  }
  const nbdSocket = join(dataDir, 'nbd.sock');
  const qmpSocket = join(dataDir, 'qmp.sock');
  opts.items.unshift(
    { kind: 'blockdev', keyval: false, options: { driver: format, 'node-name': 'drive0', file: { driver: 'file', filename: image } } },
    {
      kind: 'nbd-server',
      options: { addr: { type: 'unix', path: nbdSocket } },
      extraAddrs: [{ type: 'inet', host: '127.0.0.1', port: DEFAULT_NBD_PORT }],
    },
    { kind: 'export', options: { type: 'nbd', id: 'disk0', 'node-name': 'drive0', name: 'disk0', writable: true } },
    { kind: 'monitor', options: { chardev: 'lockstep-qmp0' } },
  );
  opts.chardevs.set('lockstep-qmp0', { id: 'lockstep-qmp0', path: qmpSocket, server: true, wait: false });
  return { dataDir, image, format, nbdSocket, qmpSocket, nbdPort: DEFAULT_NBD_PORT };
}

export function describeDefaults(l: DefaultLayout): string {
  return [
    `lockstep daemon is running (pid ${process.pid}), serving ${l.image} (${l.format}, 1 GiB) as export 'disk0'.`,
    `  NBD:  nbd+unix:///disk0?socket=${l.nbdSocket}`,
    `        nbd://127.0.0.1:${l.nbdPort}/disk0`,
    `        e.g. nbdinfo nbd://127.0.0.1:${l.nbdPort}/disk0   or   qemu-img info nbd://127.0.0.1:${l.nbdPort}/disk0`,
    `  QMP:  lockstep qmp --socket ${l.qmpSocket} query-block-exports`,
    `        lockstep qmp --socket ${l.qmpSocket}    (interactive)`,
    `Stop with Ctrl-C (or SIGTERM).`,
    '',
  ].join('\n');
}
