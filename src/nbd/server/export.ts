// An NBD export: a named Backend on a node, the transmission flags it advertises, and the
// connections currently using it.

import type { Backend } from '../../block/backend.js';
import { TFLAG } from '../protocol.js';

export interface ExportInfo {
  name: string;
  description: string;
  nodeName: string;
  writable: boolean;
  multiConn: boolean;
  connections: number;
}

export interface ExportConnection {
  /** ends the connection now (in-flight requests still finish before the backend is released) */
  abort(): void;
  /** settles when the connection is closed and its requests have finished */
  readonly closed: Promise<void>;
}

export class NbdExport {
  readonly connections = new Set<ExportConnection>();
  removed = false;

  constructor(
    readonly name: string,
    readonly description: string,
    readonly backend: Backend,
    readonly writable: boolean,
    readonly multiConn: boolean,
  ) {}

  get size(): number {
    return this.backend.getLength();
  }

  /** Transmission flags; `structured` enables DF, which only structured replies can honour. */
  flags(structured: boolean): number {
    let f = TFLAG.HAS_FLAGS | TFLAG.SEND_FLUSH | TFLAG.SEND_FUA | TFLAG.SEND_CACHE;
    if (this.writable) f |= TFLAG.SEND_TRIM | TFLAG.SEND_WRITE_ZEROES | TFLAG.SEND_FAST_ZERO;
    else f |= TFLAG.READ_ONLY;
    if (structured) f |= TFLAG.SEND_DF;
    if (this.multiConn) f |= TFLAG.CAN_MULTI_CONN;
    return f;
  }

  info(): ExportInfo {
    return {
      name: this.name,
      description: this.description,
      nodeName: this.backend.node.name,
      writable: this.writable,
      multiConn: this.multiConn,
      connections: this.connections.size,
    };
  }
}
