// User-creatable objects (--object, object-add, object-del), kept in graph.objects so that
// drivers can find them by id (nbd's tls-creds). lockstep implements the types its features
// use: tls-creds-x509 (certificates from a QEMU-style directory), secret and authz-simple.

import type { BlockGraph } from '../block/graph.js';
import { InvalidArgumentError, NotFoundError, StateError } from '../errors.js';
import { loadTlsCreds, readCredentialsFile, type TlsCredsX509 } from '../nbd/tls.js';

export interface SecretObject {
  readonly qomType: 'secret';
  readonly id: string;
  readonly data: string;
}

export interface AuthzSimple {
  readonly qomType: 'authz-simple';
  readonly id: string;
  readonly identity: string;
}

export type UserObject = TlsCredsX509 | SecretObject | AuthzSimple;

/** object-add's tls-creds-x509 properties (dir, endpoint, verify-peer), loaded by src/nbd/tls.ts. */
function tlsCredsFromProps(id: string, props: Record<string, unknown>): TlsCredsX509 {
  const dir = props.dir;
  if (typeof dir !== 'string') throw new InvalidArgumentError("Missing 'dir' property value");
  const endpoint = props.endpoint === 'server' ? 'server' : 'client';
  const verifyPeer = props['verify-peer'] !== false;
  return loadTlsCreds({ id, endpoint, dir, verifyPeer });
}

export class ObjectTable {
  /** ids held by a listener or export ("object 'x' is in use") */
  private readonly users = new Map<string, number>();

  constructor(private readonly graph: BlockGraph) {}

  /** Creates an object from validated object-add arguments ({qom-type, id, ...props}). */
  add(args: Record<string, unknown>): UserObject {
    const qomType = args['qom-type'] as string;
    const id = args.id as string;
    if (!/^[A-Za-z][A-Za-z0-9_.-]*$/.test(id)) throw new InvalidArgumentError(`Parameter 'id' expects an identifier`);
    if (this.graph.objects.has(id)) throw new InvalidArgumentError(`attempt to add duplicate property '${id}' to object (type 'container')`);
    let obj: UserObject;
    switch (qomType) {
      case 'tls-creds-x509':
        obj = tlsCredsFromProps(id, args);
        break;
      case 'secret': {
        if (typeof args.data === 'string') obj = { qomType: 'secret', id, data: args.data };
        else if (typeof args.file === 'string') {
          const data = readCredentialsFile(args.file, true)!.toString('utf8');
          obj = { qomType: 'secret', id, data };
        } else throw new InvalidArgumentError('Either data or file must be provided');
        break;
      }
      case 'authz-simple':
        obj = { qomType: 'authz-simple', id, identity: args.identity as string };
        break;
      default:
        throw new InvalidArgumentError(`Object type '${qomType}' is not supported by lockstep`);
    }
    this.graph.objects.set(id, obj);
    return obj;
  }

  get(id: string): UserObject | undefined {
    return this.graph.objects.get(id) as UserObject | undefined;
  }

  /** TLS credentials by id for `endpoint`, with QEMU's messages. */
  tlsCreds(id: string, endpoint: 'server' | 'client'): TlsCredsX509 {
    const o = this.graph.objects.get(id) as UserObject | undefined;
    if (!o) throw new InvalidArgumentError(`No TLS credentials with id '${id}'`);
    if (o.qomType !== 'tls-creds-x509') throw new InvalidArgumentError(`Object with id '${id}' is not TLS credentials`);
    if (o.endpoint !== endpoint) {
      throw new InvalidArgumentError(
        endpoint === 'server' ? 'Expecting TLS credentials with a server endpoint' : 'Expecting TLS credentials with a client endpoint',
      );
    }
    return o;
  }

  use(id: string): () => void {
    this.users.set(id, (this.users.get(id) ?? 0) + 1);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const n = (this.users.get(id) ?? 1) - 1;
      if (n <= 0) this.users.delete(id);
      else this.users.set(id, n);
    };
  }

  del(id: string): void {
    if (!this.graph.objects.has(id)) throw new NotFoundError(`object '${id}' not found`);
    if (this.users.has(id)) throw new StateError(`object '${id}' is in use, can not be deleted`);
    this.graph.objects.delete(id);
  }

  list(): UserObject[] {
    return [...this.graph.objects.values()] as UserObject[];
  }
}

/** node:tls server options from server credentials (verify-peer: clients need a CA-signed certificate). */
export function tlsServerOptions(c: TlsCredsX509): { key?: Buffer; cert?: Buffer; ca: Buffer; requestCert: boolean; rejectUnauthorized: boolean } {
  return { ...(c.key ? { key: c.key } : {}), ...(c.cert ? { cert: c.cert } : {}), ca: c.ca, requestCert: c.verifyPeer, rejectUnauthorized: c.verifyPeer };
}
