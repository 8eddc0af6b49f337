// TLS credentials, QEMU's tls-creds-x509 object: a directory holding ca-cert.pem and, per
// endpoint, server-cert.pem + server-key.pem or client-cert.pem + client-key.pem. The
// daemon puts TlsCredsX509 objects into graph.objects (--object tls-creds-x509,id=...);
// the nbd driver looks them up by id, the NBD server takes the loaded PEMs.

import { readFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { InvalidArgumentError } from '../errors.js';

export interface TlsCredsX509 {
  readonly type?: 'tls-creds-x509';
  id: string;
  endpoint: 'server' | 'client';
  dir: string;
  /** server: require and check a client certificate; client: check the server's (default true) */
  verifyPeer: boolean;
  /** PEM contents, filled by loadTlsCreds */
  key?: Buffer;
  cert?: Buffer;
  ca?: Buffer;
}

/** PEMs handed to the NBD server (new NbdServer({ tls })). */
export interface TlsServerConfig {
  key: Buffer | string;
  cert: Buffer | string;
  ca?: Buffer | string;
  /** require a client certificate signed by `ca` */
  verifyPeer?: boolean;
}

/** PEMs used by the NBD client. */
export interface TlsClientConfig {
  ca?: Buffer | string;
  cert?: Buffer | string;
  key?: Buffer | string;
  /** check the server's certificate against `ca` (default true) */
  verifyPeer?: boolean;
  /** name checked against the server certificate (default: the host connected to) */
  hostname?: string;
}

function readPem(dir: string, name: string, required: boolean): Buffer | undefined {
  const p = join(dir, name);
  if (!existsSync(p)) {
    if (required) throw new InvalidArgumentError(`Unable to access credentials ${p}: No such file or directory`);
    return undefined;
  }
  try {
    return readFileSync(p);
  } catch (e) {
    throw new InvalidArgumentError(`Unable to read credentials ${p}: ${(e as Error).message}`);
  }
}

/**
 * Creates a tls-creds-x509 object from a QEMU-style directory, reading its PEM files now
 * (as QEMU does at object creation), so a missing file is reported at once.
 */
export function loadTlsCreds(opts: { id: string; endpoint?: 'server' | 'client'; dir: string; verifyPeer?: boolean }): TlsCredsX509 {
  const endpoint = opts.endpoint ?? 'client';
  const verifyPeer = opts.verifyPeer ?? true;
  const creds: TlsCredsX509 = { type: 'tls-creds-x509', id: opts.id, endpoint, dir: opts.dir, verifyPeer };
  // Checking the peer needs the CA, on either side (QEMU's rule too).
  const ca = readPem(opts.dir, 'ca-cert.pem', verifyPeer);
  if (ca) creds.ca = ca;
  const prefix = endpoint === 'server' ? 'server' : 'client';
  const cert = readPem(opts.dir, `${prefix}-cert.pem`, endpoint === 'server');
  const key = readPem(opts.dir, `${prefix}-key.pem`, endpoint === 'server');
  if (cert) creds.cert = cert;
  if (key) creds.key = key;
  return creds;
}

export function isTlsCreds(v: unknown): v is TlsCredsX509 {
  const o = v as Partial<TlsCredsX509> | null;
  return typeof o === 'object' && o !== null && typeof o.id === 'string' && (o.endpoint === 'server' || o.endpoint === 'client') && typeof o.dir === 'string';
}

export function serverTlsConfig(creds: TlsCredsX509): TlsServerConfig {
  if (creds.endpoint !== 'server') throw new InvalidArgumentError(`Expecting TLS credentials with a server endpoint`);
  if (!creds.key || !creds.cert) throw new InvalidArgumentError(`TLS credentials '${creds.id}' have no server key and certificate`);
  const cfg: TlsServerConfig = { key: creds.key, cert: creds.cert, verifyPeer: creds.verifyPeer };
  if (creds.ca) cfg.ca = creds.ca;
  return cfg;
}

export function clientTlsConfig(creds: TlsCredsX509, hostname?: string): TlsClientConfig {
  if (creds.endpoint !== 'client') throw new InvalidArgumentError(`Expecting TLS credentials with a client endpoint`);
  const cfg: TlsClientConfig = { verifyPeer: creds.verifyPeer };
  if (creds.ca) cfg.ca = creds.ca;
  if (creds.cert) cfg.cert = creds.cert;
  if (creds.key) cfg.key = creds.key;
  if (hostname !== undefined) cfg.hostname = hostname;
  return cfg;
}
