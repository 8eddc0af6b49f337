// `lockstep pair outdate-peer`: DRBD's outdate-peer by hand, on the node of a primary that went
// on alone: marks the peer's generation record Outdated through the peer's daemon (x-meta-write),
// so that a `lockstep pair takeover` there (or the agent's promote) is refused. The supervisor
// does the same by itself whenever it reaches the peer; this is for when it cannot run (its
// node restarted, or no supervisor runs the pair any more). The local record is only read: the
// supervisor owns it and drops its note of the peer when it reaches the peer itself.

import { readFileSync } from 'node:fs';
import { join, posix } from 'node:path';
import { QmpClient, type QmpClientOptions } from '../qmp/client.js';
import type { SocketAddress } from '../util/socket-address.js';
import { errorMessage } from '../errors.js';
import { outdateBy, parseMeta, type DiskMeta } from './generations.js';
import { DISK_FILE } from './disks.js';

export class OutdateError extends Error {
  constructor(
    readonly code: 'ENOMETA' | 'ENOTALONE' | 'ENOTPEER',
    message: string,
  ) {
    super(message);
  }
}

export interface OutdateOptions {
  /** this node's data directory (primary.qcow2 and its record) */
  dir: string;
  /** the peer's daemon */
  qmp: SocketAddress;
  qmpOptions?: QmpClientOptions;
  /** the peer's data directory on its node */
  peerDir: string;
}

export interface OutdateResult {
  /** the peer's record was marked by an earlier run (or by the supervisor): nothing written */
  'already-done': boolean;
  'peer-generation': string;
  outdated: string;
}

function localRecord(dir: string): DiskMeta {
  const path = join(dir, `${DISK_FILE.primary}.meta.json`);
  let value: unknown;
  try {
    value = JSON.parse(readFileSync(path, 'utf8'));
  } catch (e) {
    throw new OutdateError('ENOMETA', `cannot read this disk's generation record ${path}: ${errorMessage(e)}`);
  }
  const m = parseMeta(value, path);
  if (!m) throw new OutdateError('ENOMETA', `there is no generation record ${path}`);
  return m;
}

export async function outdatePeerByHand(o: OutdateOptions): Promise<OutdateResult> {
  const local = localRecord(o.dir);
  // the generation this disk went on from: noted when the peer could not be marked, else its bitmap id
  const left = local.peerNotOutdated ?? local.bitmap;
  if (left === null || local.role !== 'primary') {
    throw new OutdateError('ENOTALONE', `this disk (generation ${local.current}, role ${local.role}) has not gone on alone as a primary from a peer's generation: nothing to outdate`);
  }
  const q = await QmpClient.open(o.qmp, o.qmpOptions ?? {});
  try {
    const path = posix.join(o.peerDir, `${DISK_FILE.secondary}.meta.json`);
    const peer = parseMeta(await q.execute('x-meta-read', { filename: path }), path);
    if (!peer) throw new OutdateError('ENOMETA', `the peer has no generation record ${path}`);
    if (peer.outdated === local.current) return { 'already-done': true, 'peer-generation': peer.current, outdated: local.current };
    const marked = outdateBy(peer, left, local.current);
    if (!marked) {
      throw new OutdateError(
        'ENOTPEER',
        `the peer's disk is at generation ${peer.current}, not ${left} that this disk went on from: not marked (it went on too, or was resynced; the generations decide when the pair starts)`,
      );
    }
    await q.execute('x-meta-write', { filename: path, data: marked });
    return { 'already-done': false, 'peer-generation': peer.current, outdated: local.current };
  } finally {
    q.close();
  }
}
