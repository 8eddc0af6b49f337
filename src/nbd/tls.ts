// TLS credentials, QEMU's tls-creds-x509 object: a directory holding ca-cert.pem and, per
// endpoint, server-cert.pem + server-key.pem or client-cert.pem + client-key.pem. The
// daemon puts TlsCredsX509 objects into graph.objects (--object tls-creds-x509,id=...);
// the nbd driver looks them up by id, the NBD server takes the loaded PEMs.

import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { InvalidArgumentError, strerrorOf } from '../errors.js';

/** The one tls-creds-x509 object: the daemon's --object/object-add and the nbd driver share it. */
export interface TlsCredsX509 {
  readonly qomType: 'tls-creds-x509';
  readonly id: string;
  readonly endpoint: 'server' | 'client';
  readonly dir: string;
  /** server: require and check a client certificate; client: check the server's (default true) */
  readonly verifyPeer: boolean;
  /** PEM contents, read when the object is created */
  readonly ca: Buffer;
  readonly cert?: Buffer;
  readonly key?: Buffer;
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

/** A credentials file, with QEMU's message when a required one cannot be read. */
export function readCredentialsFile(path: string, required: boolean): Buffer | undefined {
  try {
    return readFileSync(path);
  } catch (e) {
    if (!required) return undefined;
    const code = (e as { code?: string }).code ?? 'EIO';
    throw new InvalidArgumentError(`Unable to access credentials ${path}: ${strerrorOf(code) ?? code}`);
  }
}

/**
 * Creates a tls-creds-x509 object from a QEMU-style directory, reading its PEM files now
 * (as QEMU does at object creation), so a missing file is reported at once. QEMU 7.2's rule
 * (crypto/tlscredsx509.c): ca-cert.pem is required on both endpoints, whether or not the peer
 * is verified; a server needs its certificate and key, a client's are optional (needed only
 * when the server verifies it).
 */
export function loadTlsCreds(opts: { id: string; endpoint?: 'server' | 'client'; dir: string; verifyPeer?: boolean }): TlsCredsX509 {
  const endpoint = opts.endpoint ?? 'client';
  const verifyPeer = opts.verifyPeer ?? true;
  const ca = readCredentialsFile(join(opts.dir, 'ca-cert.pem'), true)!;
  const cert = readCredentialsFile(join(opts.dir, `${endpoint}-cert.pem`), endpoint === 'server');
  const key = readCredentialsFile(join(opts.dir, `${endpoint}-key.pem`), endpoint === 'server');
  return { qomType: 'tls-creds-x509', id: opts.id, endpoint, dir: opts.dir, verifyPeer, ca, ...(cert ? { cert } : {}), ...(key ? { key } : {}) };
}

export function isTlsCreds(v: unknown): v is TlsCredsX509 {
  return typeof v === 'object' && v !== null && (v as { qomType?: unknown }).qomType === 'tls-creds-x509';
}

export function serverTlsConfig(creds: TlsCredsX509): TlsServerConfig {
  if (creds.endpoint !== 'server') throw new InvalidArgumentError(`Expecting TLS credentials with a server endpoint`);
  if (!creds.key || !creds.cert) throw new InvalidArgumentError(`TLS credentials '${creds.id}' have no server key and certificate`);
  return { key: creds.key, cert: creds.cert, ca: creds.ca, verifyPeer: creds.verifyPeer };
}

export function clientTlsConfig(creds: TlsCredsX509, hostname?: string): TlsClientConfig {
  if (creds.endpoint !== 'client') throw new InvalidArgumentError(`Expecting TLS credentials with a client endpoint`);
  const cfg: TlsClientConfig = { verifyPeer: creds.verifyPeer, ca: creds.ca };
  if (creds.cert) cfg.cert = creds.cert;
  if (creds.key) cfg.key = creds.key;
  if (hostname !== undefined) cfg.hostname = hostname;
  return cfg;
}
