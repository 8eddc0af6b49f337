// The block graph: nodes by node-name, named backends, opening nodes from options, and the
// graph edits every feature plugs into (attach, detach, replace a node under its parents,
// insert and drop filters). An instance is created by main and passed down; two graphs in
// one process never see each other.
//
// Edits validate everything first and then apply pointer swaps synchronously, so an edit
// that fails leaves the graph as it was (prepare -> commit | abort without a half state).

import { EventEmitter } from 'node:events';
import { BlockError, InvalidArgumentError, NotFoundError, StateError, assert, errorMessage } from '../errors.js';
import type { BlockDriver, OpenChildOptions, OpenContext } from './driver.js';
import { BlockNode, Edge } from './node.js';
import { Backend, type BackendOptions } from './backend.js';
import { OptionReader, isDict, type OptionDict } from './options.js';
import type { DriverRegistry } from './registry.js';
import { Pacer } from '../util/pacer.js';
import { PERM, PERM_ALL, PermissionError, cumulative, defaultChildPerms, findParentConflict, type Perms } from './permissions.js';

export interface OpenOptions {
  /** leaves are keyval strings (command line, drive_add) rather than typed JSON */
  keyval?: boolean;
  /** blockdev-add / --blockdev: the node lives until blockdev-del */
  monitorOwned?: boolean;
  /** default for read-only when the options do not say */
  readOnly?: boolean;
  /** opened for metadata only (qemu-img info's BDRV_O_NO_IO): inherited by inline children */
  noIo?: boolean;
}

export interface CacheOptions {
  direct: boolean;
  noFlush: boolean;
}

export interface GraphOpenContext extends OpenContext {
  readonly cache: CacheOptions;
}

/** The graph's services, one typed field each, declared by their owners above block/ with
 * `declare module` (jobs, replication, ioHolds), so block/ imports none of them. */
export interface GraphServices {}

/** QEMU's id_wellformed; node names are also shorter than 32 bytes (checked after) */
const NODE_NAME_RE = /^[A-Za-z][A-Za-z0-9_.-]*$/;

export class BlockGraph extends EventEmitter {
  readonly nodes = new Map<string, BlockNode>();
  readonly backends = new Map<string, Backend>();
  /**
   * User-creatable objects by id (QEMU's object-add / --object: tls-creds-x509, ...).
   * Drivers that reference an object by id (nbd's tls-creds) look it up here.
   */
  readonly objects = new Map<string, unknown>();
  /**
   * Per-graph services that drivers reach through their graph (the job manager, the
   * replication registry). Kept here rather than in module globals so that two graphs never
   * share them.
   */
  readonly services: GraphServices = {};
  /** shares each event-loop turn between the graph's long requests (util/pacer.ts) */
  readonly pacer = new Pacer();
  private autoCounter = 0;
  private readonly pendingCloses = new Set<Promise<void>>();
  private readonly closing = new Map<BlockNode, Promise<void>>();
  /** while closeAll runs: the closes that failed (a format's close-time writeback) */
  private closeErrors: Array<{ node: BlockNode; error: unknown }> | null = null;

  constructor(readonly drivers: DriverRegistry) {
    super();
  }

  // ---- lookup -------------------------------------------------------------------------

  /** A node by node-name, or the root node of a named backend (QEMU's bdrv_lookup_bs). */
  lookup(name: string): BlockNode | null {
    const n = this.nodes.get(name);
    // a node still being opened has its name reserved but is not visible yet
    if (n) return n.isOpen ? n : null;
    return this.backends.get(name)?.node ?? null;
  }

  /** Like lookup, with QEMU's message when nothing matches. */
  find(name: string): BlockNode {
    const n = this.lookup(name);
    if (!n) throw new NotFoundError(`Cannot find device='${name}' nor node-name='${name}'`);
    return n;
  }

  /** A node by node-name only. */
  getNode(name: string): BlockNode {
    const n = this.nodes.get(name);
    if (!n || !n.isOpen) throw new NotFoundError(`Cannot find node-name='${name}'`);
    return n;
  }

  // ---- opening --------------------------------------------------------------------------

  /** Opens a node (and its inline children) from QEMU-style options. */
  async open(options: OptionDict, opts: OpenOptions = {}): Promise<BlockNode> {
    const node = await this.openNode(options, '', opts.keyval ?? false, opts.readOnly ?? false, false, opts.noIo ?? false);
    if (opts.monitorOwned) node.monitorOwned = true;
    return node;
  }

  private newAutoName(): string {
    for (;;) {
      const name = `#block${String(++this.autoCounter).padStart(3, '0')}`;
      if (!this.nodes.has(name)) return name;
    }
  }

  private async openNode(
    options: OptionDict,
    prefix: string,
    keyval: boolean,
    parentReadOnly: boolean,
    parentForceShare: boolean,
    noIo: boolean,
  ): Promise<BlockNode> {
    const r = new OptionReader(options, prefix, keyval);
    const driverName = r.string('driver', true);
    const driver: BlockDriver | undefined = this.drivers.get(driverName);
    if (!driver) throw new InvalidArgumentError(`Parameter '${r.path('driver')}' does not accept value '${driverName}'`);
    const given = r.string('node-name');
    const nameError = given === undefined ? null : this.nodeNameError(given);
    if (nameError) {
      // QEMU opens a format's or filter's file before it names the node (bdrv_open_inherit),
      // so the file's own errors come first
      if (driver.kind !== 'protocol') await this.probeFile(options.file, r.path('file'), keyval, r.bool('read-only') ?? parentReadOnly, parentForceShare, noIo);
      throw nameError;
    }
    const readOnly = r.bool('read-only') ?? parentReadOnly;
    r.bool('auto-read-only');
    // inherited by inline children, as QEMU's bdrv_inherited_options does
    const forceShare = r.bool('force-share') ?? parentForceShare;
    r.enumOf('discard', ['ignore', 'unmap', 'off', 'on']);
    r.enumOf('detect-zeroes', ['off', 'on', 'unmap']);
    const cacheR = r.sub('cache');
    const cache: CacheOptions = {
      direct: cacheR?.bool('direct') ?? false,
      noFlush: cacheR?.bool('no-flush') ?? false,
    };
    cacheR?.done();

    const name = given ?? this.newAutoName();
    const recorded: OptionDict = {};
    for (const [k, v] of Object.entries(options)) if (!isDict(v)) recorded[k] = v;
    const node = new BlockNode(this, name, driver, recorded, readOnly, given === undefined);
    node.forceShare = forceShare;
    node.noIo = noIo;
    // Reserve the name now so that children cannot take it.
    this.nodes.set(name, node);
    const ctx: GraphOpenContext = {
      graph: this,
      node,
      readOnly,
      cache,
      openChild: (role: string, value: unknown, copts?: OpenChildOptions) =>
        this.openChild(node, role, value, r.path(role), keyval, copts ?? {}),
    };
    try {
      const impl = await driver.open(ctx, r);
      node.setImpl(impl);
      try {
        r.done();
      } catch (e) {
        await impl.close().catch(() => {});
        throw e;
      }
    } catch (e) {
      this.nodes.delete(name);
      for (const edge of [...node.children.values()]) this.detachEdge(edge);
      await this.settle();
      throw e;
    }
    this.emit('node-added', node);
    return node;
  }

  private nodeNameError(name: string): InvalidArgumentError | null {
    if (!NODE_NAME_RE.test(name)) return new InvalidArgumentError(`Invalid node-name: '${name}'`);
    if (this.nodes.has(name)) return new InvalidArgumentError(`Duplicate nodes with node-name='${name}'`);
    if (this.backends.has(name)) return new InvalidArgumentError(`node-name=${name} is conflicting with a device id`);
    if (name.length >= 32) return new InvalidArgumentError('Node name too long');
    return null;
  }

  /** Finds or opens (and closes again) a node's `file` as QEMU would before naming the node. */
  private async probeFile(value: unknown, path: string, keyval: boolean, readOnly: boolean, forceShare: boolean, noIo: boolean): Promise<void> {
    if (typeof value === 'string' && !(keyval && value === '')) {
      if (!this.lookup(value)) throw new InvalidArgumentError(`Cannot find device='${value}' nor node-name='${value}'`);
    } else if (isDict(value)) {
      const n = await this.openNode(value, path, keyval, readOnly, forceShare, noIo);
      this.collect(n);
      await this.settle();
    }
  }

  private async openChild(
    parent: BlockNode,
    role: string,
    value: unknown,
    path: string,
    keyval: boolean,
    copts: OpenChildOptions,
  ): Promise<BlockNode | null> {
    if (value === undefined || value === null || (keyval && value === '')) {
      if (copts.required) throw new InvalidArgumentError(`Parameter '${path}' is missing`);
      return null;
    }
    let child: BlockNode;
    try {
      if (typeof value === 'string') {
        const found = this.lookup(value);
        if (!found) throw new InvalidArgumentError(`Cannot find device='${value}' nor node-name='${value}'`);
        child = found;
      } else if (isDict(value)) {
        const prefix = path;
        child = await this.openNode(value, prefix, keyval, copts.readOnly ?? parent.readOnly, parent.forceShare, parent.noIo);
      } else {
        throw new InvalidArgumentError(`Invalid parameter type for '${path}', expected: BlockdevRef`);
      }
    } catch (e) {
      // the error keeps its class (and errno-like code); only its text gains the prefix
      if (copts.errorPrefix !== undefined && e instanceof Error) e.message = `${copts.errorPrefix}${e.message}`;
      throw e;
    }
    try {
      this.attach(parent, role, child);
    } catch (e) {
      // an inline child refused by the permissions goes with its parent (a reference stays)
      if (isDict(value)) {
        this.collect(child);
        await this.settle();
      }
      throw e;
    }
    return child;
  }

  // ---- edges --------------------------------------------------------------------------

  attach(parent: BlockNode, role: string, child: BlockNode): Edge {
    if (parent.children.has(role)) throw new StateError(`Node '${parent.name}' already has a child '${role}'`);
    if (child === parent || this.reaches(child, parent)) {
      throw new StateError(`Making '${child.name}' a child of '${parent.name}' would create a cycle`);
    }
    const edge = new Edge(parent, role, child);
    this.setChildEdgePerms(edge, cumulative(parent.parents));
    parent.children.set(role, edge);
    child.parents.add(edge);
    try {
      this.refreshPerms([child]);
    } catch (e) {
      parent.children.delete(role);
      child.parents.delete(edge);
      throw e;
    }
    return edge;
  }

  /** Removes a child edge; a child nothing references any more is closed. */
  detach(parent: BlockNode, role: string): void {
    const edge = parent.children.get(role);
    if (edge) this.detachEdge(edge);
  }

  private detachEdge(edge: Edge): void {
    const parent = edge.parent;
    assert(parent instanceof BlockNode);
    parent.children.delete(edge.role);
    edge.child.parents.delete(edge);
    this.refreshPermsQuietly([edge.child]);
    this.collect(edge.child);
  }

  /** true if `to` is reachable from `from` through child edges */
  reaches(from: BlockNode, to: BlockNode): boolean {
    if (from === to) return true;
    for (const e of from.children.values()) if (this.reaches(e.child, to)) return true;
    return false;
  }

  /**
   * Re-points every parent edge of `from` to `to`, except the edges in `except` (for
   * instance a filter's own edge to the node it filters). Validated first, then applied.
   */
  replaceNode(from: BlockNode, to: BlockNode, except: Edge[] = []): void {
    const edges = [...from.parents].filter((e) => !except.includes(e));
    for (const e of edges) {
      if (e.parent instanceof BlockNode && this.reaches(to, e.parent)) {
        throw new StateError(`Replacing '${from.name}' by '${to.name}' would create a cycle`);
      }
    }
    for (const e of edges) e.setChild(to);
    try {
      // `from` first: a filter being dropped stops needing anything of the node below it
      // (its own edge would otherwise refuse the parents that move there)
      this.refreshPerms([from, to]);
    } catch (err) {
      for (const e of edges) e.setChild(from);
      this.refreshPermsQuietly([to]);
      throw err;
    }
    this.refreshPermsQuietly([from]);
    this.collect(from);
  }

  /** Re-points one child edge of `parent` to `to` (replication's file switch at failover). */
  replaceChild(parent: BlockNode, role: string, to: BlockNode): void {
    const edge = parent.children.get(role);
    if (!edge) throw new StateError(`Node '${parent.name}' does not have child '${role}'`);
    if (this.reaches(to, parent)) throw new StateError(`Replacing child '${role}' of '${parent.name}' would create a cycle`);
    const old = edge.child;
    edge.setChild(to);
    try {
      this.refreshPerms([to]);
    } catch (err) {
      edge.setChild(old);
      this.refreshPermsQuietly([to]);
      throw err;
    }
    this.refreshPermsQuietly([old]);
    this.collect(old);
  }

  /**
   * Inserts an opened filter node (whose `file` child is already `below`) above `below`:
   * every other parent of `below` now points to the filter.
   */
  insertFilter(filter: BlockNode, below: BlockNode): void {
    const own = filter.children.get('file');
    if (!own || own.child !== below) throw new StateError(`Filter '${filter.name}' does not filter '${below.name}'`);
    this.replaceNode(below, filter, [own]);
  }

  /** Drops a filter: its parents point to its file child again; the filter is closed. */
  dropFilter(filter: BlockNode): void {
    const below = filter.file;
    if (!below) throw new StateError(`Node '${filter.name}' is not a filter`);
    const wasOwned = filter.monitorOwned;
    filter.monitorOwned = false;
    try {
      this.replaceNode(filter, below);
    } catch (e) {
      filter.monitorOwned = wasOwned;
      throw e;
    }
  }

  // ---- backends -------------------------------------------------------------------------

  createBackend(node: BlockNode, opts: BackendOptions = {}): Backend {
    if (opts.name !== undefined) {
      if (this.backends.has(opts.name)) throw new InvalidArgumentError(`Device with id '${opts.name}' already exists`);
      if (this.nodes.has(opts.name)) throw new InvalidArgumentError(`Device name '${opts.name}' conflicts with an existing node name`);
    }
    const b = new Backend(node, opts);
    try {
      this.refreshPerms([node]);
    } catch (e) {
      b.closed = true;
      node.parents.delete(b.edge);
      throw e;
    }
    if (opts.name !== undefined) this.backends.set(opts.name, b);
    return b;
  }

  // ---- permissions (block/permissions.ts) -----------------------------------------------

  /** Changes what a backend takes and shares (QEMU's blk_set_perm); refused as a whole. */
  setBackendPerms(b: Backend, perms: Perms): void {
    const old = { perm: b.edge.perm, shared: b.edge.shared };
    b.edge.perm = perms.perm;
    b.edge.shared = perms.shared;
    try {
      this.refreshPerms([b.node]);
    } catch (e) {
      b.edge.perm = old.perm;
      b.edge.shared = old.shared;
      throw e;
    }
  }

  /** QEMU's get_parent_desc for one parent edge */
  private parentDesc(e: Edge): string {
    return e.parent instanceof BlockNode ? `node '${e.parent.name}'` : e.parent.desc;
  }

  /** Sets a node-to-child edge's permissions from what the parent's parents take. */
  private setChildEdgePerms(edge: Edge, parentPerms: Perms): void {
    const parent = edge.parent;
    assert(parent instanceof BlockNode);
    const d = parent.driver;
    const p = d.childPerms ? d.childPerms(parent, edge.role, parentPerms) : defaultChildPerms(d.kind, edge.role, parentPerms, !parent.readOnly, parent.noIo);
    edge.perm = p.perm;
    edge.shared = edge.child.forceShare ? PERM_ALL : p.shared;
  }

  /**
   * QEMU's bdrv_refresh_perms: walks `starts` and every node below them, parents before
   * children; each node's parents must agree (findParentConflict), the node prepares its
   * new cumulative permissions (image locks), and its child edges are recomputed. On any
   * refusal every edge and lock is put back and the error thrown; otherwise the prepared
   * changes are committed.
   */
  refreshPerms(starts: BlockNode[]): void {
    const seen = new Set<BlockNode>();
    const post: BlockNode[] = [];
    const visit = (n: BlockNode): void => {
      if (seen.has(n)) return;
      seen.add(n);
      for (const e of n.children.values()) visit(e.child);
      post.push(n);
    };
    for (const s of starts) visit(s);
    const saved: Array<[Edge, number, number]> = [];
    const prepared: Array<{ commit(): void; abort(): void }> = [];
    try {
      for (let i = post.length - 1; i >= 0; i--) {
        const n = post[i]!;
        // QEMU lists a node's parents newest first
        const parents = [...n.parents].reverse();
        const conflict = findParentConflict(
          n.name,
          parents.map((e) => ({ perm: e.perm, shared: e.shared, role: e.role, desc: this.parentDesc(e) })),
        );
        if (conflict) throw conflict;
        const cum = cumulative(parents);
        // QEMU's bdrv_node_refresh_perm: a read-only node has no writer, whoever asks
        if (n.readOnly && cum.perm & (PERM.WRITE | PERM.WRITE_UNCHANGED)) throw new PermissionError('Block node is read-only');
        if (n.isOpen && n.impl.preparePerms) prepared.push(n.impl.preparePerms(cum));
        for (const e of n.children.values()) {
          saved.push([e, e.perm, e.shared]);
          this.setChildEdgePerms(e, cum);
        }
      }
    } catch (e) {
      for (let i = saved.length - 1; i >= 0; i--) {
        const [edge, perm, shared] = saved[i]!;
        edge.perm = perm;
        edge.shared = shared;
      }
      for (let i = prepared.length - 1; i >= 0; i--) prepared[i]!.abort();
      throw e;
    }
    for (const p of prepared) p.commit();
  }

  /**
   * refreshPerms where permissions can only have been dropped (a parent went away): a
   * failure would be a bug or a lock the kernel refused to release, logged, not thrown.
   */
  refreshPermsQuietly(starts: BlockNode[]): void {
    try {
      this.refreshPerms(starts.filter((n) => !n.closed));
    } catch (e) {
      this.emit('error-log', `refreshing permissions: ${errorMessage(e)}`);
    }
  }

  releaseBackend(b: Backend): void {
    if (b.name !== undefined && this.backends.get(b.name) === b) this.backends.delete(b.name);
    b.release();
  }

  // ---- closing --------------------------------------------------------------------------

  /** Closes `node` if nothing references it and the monitor does not own it. */
  collect(node: BlockNode): void {
    if (node.parents.size > 0 || node.monitorOwned || node.closed) return;
    const p = this.closeNode(node).catch((e: unknown) => {
      this.emit('error-log', `closing ${node.name}: ${errorMessage(e)}`);
      this.closeErrors?.push({ node, error: e });
    });
    this.pendingCloses.add(p);
    this.closing.set(node, p);
    void p.finally(() => {
      this.pendingCloses.delete(p);
      this.closing.delete(node);
    });
  }

  private async closeNode(node: BlockNode): Promise<void> {
    node.closed = true;
    node.gates.closeAll();
    if (this.nodes.get(node.name) === node) this.nodes.delete(node.name);
    this.emit('node-removed', node);
    try {
      await node.tracker.drain();
      await node.impl.close();
    } finally {
      for (const edge of [...node.children.values()]) {
        node.children.delete(edge.role);
        edge.child.parents.delete(edge);
        this.refreshPermsQuietly([edge.child]);
        this.collect(edge.child);
      }
    }
  }

  /**
   * Waits until `node` is closed, if its close has begun. Code that may itself run inside
   * a close (a job cancelled by a closing replication node) must wait for its own nodes
   * this way: settle() would wait for the close that is waiting for it.
   */
  async whenClosed(node: BlockNode): Promise<void> {
    await this.closing.get(node);
  }

  /** Waits for closes in progress. */
  async settle(): Promise<void> {
    while (this.pendingCloses.size > 0) await Promise.all([...this.pendingCloses]);
  }

  /** blockdev-del: the node must be monitor-owned and unused. */
  async deleteNode(name: string): Promise<void> {
    const node = this.nodes.get(name);
    if (!node) throw new NotFoundError(`Failed to find node with node-name='${name}'`);
    if (!node.monitorOwned) throw new StateError(`Node ${name} is not owned by the monitor`);
    node.checkNotBlockedOrBacking();
    if (node.parents.size > 0) throw new StateError(`Block device ${name} is in use`);
    node.monitorOwned = false;
    this.collect(node);
    await this.settle();
  }

  /**
   * Closes everything (shutdown): backends first, then the nodes in dependency order, a
   * parent before its children, so that a format's close-time writeback (qcow2's cached
   * tables, its clean mark) still reaches its file. Nodes held only by internal users
   * (unnamed backends, jobs' nodes already closed) are released the same way, roots first.
   * Every node is closed even if some closes fail; the first failure is then thrown
   * (a command that wrote must not report success when its data did not reach the file).
   */
  async closeAll(): Promise<void> {
    const errors: Array<{ node: BlockNode; error: unknown }> = [];
    const outer = this.closeErrors;
    this.closeErrors = errors;
    try {
      for (const b of [...this.backends.values()]) this.releaseBackend(b);
      for (const n of this.nodes.values()) n.monitorOwned = false;
      await this.settle();
      for (let left = this.nodes.size; left > 0; ) {
        const open = [...this.nodes.values()];
        const live = (e: Edge): boolean => e.parent instanceof BlockNode && !e.parent.closed && this.nodes.get(e.parent.name) === e.parent;
        // roots: nodes no open node of this graph depends on; what else holds them (an
        // internal backend, a node already gone) lets go now
        let roots = open.filter((n) => ![...n.parents].some(live));
        // cannot happen (attach refuses cycles), but never loop forever: close the rest
        if (roots.length === 0) roots = open;
        for (const n of roots) {
          for (const e of [...n.parents]) {
            if (e.parent instanceof Backend) e.parent.release();
            else n.parents.delete(e);
          }
          this.collect(n);
        }
        await this.settle();
        // a node that refuses to go (nothing should) must not keep shutdown spinning
        if (this.nodes.size >= left) break;
        left = this.nodes.size;
      }
    } finally {
      this.closeErrors = outer;
      outer?.push(...errors);
    }
    const first = errors[0];
    if (first) {
      const msg = errors.map((f) => `closing ${f.node.name}: ${errorMessage(f.error)}`).join('; ');
      const code = first.error instanceof BlockError ? first.error.code : 'EIO';
      throw new BlockError(code, msg, { cause: first.error });
    }
  }
}
