// Block graph commands: blockdev-add, blockdev-del, blockdev-reopen,
// query-named-block-nodes, x-blockdev-change, block_resize.

import { BlockNode } from '../../block/node.js';
import type { OptionDict } from '../../block/options.js';
import { InvalidArgumentError, StateError } from '../../errors.js';
import { command, type QmpCommand, type QmpContext } from '../dispatch.js';
import { QmpError } from '../errors.js';
import { RESIZE_PERMS } from '../../block/permissions.js';
import { BLOCK_RESIZE, BLOCKDEV_DEL, BLOCKDEV_REOPEN, QUERY_NAMED_BLOCK_NODES, X_BLOCKDEV_CHANGE } from '../schema/block.js';
import { ANY_DICT } from '../schema/types.js';

/** QEMU's "json:{...}" filename for nodes without a plain file name. */
function jsonFilename(node: BlockNode): string {
  const opts: Record<string, unknown> = { driver: node.driver.name };
  for (const [k, v] of Object.entries(node.options)) {
    if (k === 'driver' || k === 'node-name' || k === 'read-only' || k === 'auto-read-only' || k === 'discard' || k === 'detect-zeroes') continue;
    opts[k] = v;
  }
  for (const [role, edge] of node.children) opts[role] = edge.child.autoName ? JSON.parse(filenameOf(edge.child).replace(/^json:/, '') || '{}') : edge.child.name;
  return 'json:' + JSON.stringify(opts);
}

export function filenameOf(node: BlockNode): string {
  const own = node.isOpen ? node.impl.filename : undefined;
  if (own) return own;
  const file = node.file;
  if (file && node.driver.kind !== 'filter') {
    const f = filenameOf(file);
    if (!f.startsWith('json:')) return f;
  }
  return jsonFilename(node);
}

function backingDepth(node: BlockNode): number {
  let depth = 0;
  for (let b = node.backing; b; b = b.backing) depth++;
  return depth;
}

function imageInfo(node: BlockNode, flat: boolean): Record<string, unknown> {
  const info = node.isOpen ? (node.impl.info?.() ?? {}) : {};
  const img: Record<string, unknown> = {
    'virtual-size': node.isOpen ? node.getLength() : 0,
    filename: filenameOf(node),
    format: node.driver.name,
  };
  for (const key of ['cluster-size', 'actual-size', 'dirty-flag', 'encrypted', 'format-specific']) {
    if (info[key] !== undefined) img[key] = info[key];
  }
  const backing = node.backing;
  if (backing) {
    img['backing-filename'] = filenameOf(backing);
    img['full-backing-filename'] = filenameOf(backing);
    img['backing-filename-format'] = backing.driver.name;
    if (!flat) img['backing-image'] = imageInfo(backing, false);
  }
  return img;
}

/** QEMU's BlockDeviceInfo for one node. */
export function blockDeviceInfo(node: BlockNode, flat = false): Record<string, unknown> {
  const o = node.options;
  const detect = typeof o['detect-zeroes'] === 'string' ? o['detect-zeroes'] : 'off';
  const info: Record<string, unknown> = {
    file: filenameOf(node),
    'node-name': node.name,
    ro: node.readOnly,
    drv: node.driver.name,
    backing_file_depth: backingDepth(node),
    encrypted: false,
    detect_zeroes: detect,
    bps: 0,
    bps_rd: 0,
    bps_wr: 0,
    iops: 0,
    iops_rd: 0,
    iops_wr: 0,
    image: imageInfo(node, flat),
    cache: { writeback: true, direct: truthy(o['cache.direct']), 'no-flush': truthy(o['cache.no-flush']) },
    write_threshold: 0,
  };
  if (node.backing) info.backing_file = filenameOf(node.backing);
  return info;
}

function truthy(v: unknown): boolean {
  return v === true || v === 'on' || v === 'true' || v === 'yes';
}

async function blockdevAdd(ctx: QmpContext, args: OptionDict): Promise<void> {
  if (args.driver === undefined) throw new InvalidArgumentError(`Parameter 'driver' is missing`);
  if (typeof args['node-name'] !== 'string') throw new InvalidArgumentError("'node-name' must be specified for the root node");
  const node = await ctx.graph.open(args, { keyval: false, monitorOwned: true });
  ctx.log.info('node added', { node: node.name, driver: node.driver.name });
}

async function blockdevDel(ctx: QmpContext, name: string): Promise<void> {
  const node = ctx.graph.nodes.get(name);
  // QEMU's bdrv_has_blk, before anything else: any BlockBackend (an export's, a job's handle
  // as 'root'), whoever owns the node
  if (node && [...node.parents].some((e) => !(e.parent instanceof BlockNode) && e.role === 'root')) throw new StateError(`Node ${name} is in use`);
  await ctx.graph.deleteNode(name);
  ctx.log.info('node deleted', { node: name });
}

/**
 * blockdev-reopen: every node's new options are checked before any is applied. lockstep can
 * change `read-only`; any other option must keep its value.
 */
async function blockdevReopen(ctx: QmpContext, list: OptionDict[]): Promise<void> {
  const plan: Array<{ node: BlockNode; readOnly: boolean }> = [];
  for (const opts of list) {
    const name = opts['node-name'];
    if (typeof name !== 'string') throw new InvalidArgumentError('node-name not specified');
    const node = ctx.graph.nodes.get(name);
    if (!node) throw new InvalidArgumentError(`Failed to find node with node-name='${name}'`);
    if (opts.driver !== node.driver.name) {
      if (opts.driver === undefined) throw new InvalidArgumentError(`Parameter 'driver' is missing`);
      throw new InvalidArgumentError(`Cannot change the option 'driver'`);
    }
    for (const [k, v] of Object.entries(opts)) {
      if (k === 'driver' || k === 'node-name' || k === 'read-only' || k === 'auto-read-only') continue;
      const child = node.children.get(k);
      if (child) {
        if (v === child.child.name) continue;
        throw new InvalidArgumentError(`Cannot change the option '${k}'`);
      }
      const cur = node.options[k];
      if (cur === undefined || JSON.stringify(cur) !== JSON.stringify(v)) throw new InvalidArgumentError(`Cannot change the option '${k}'`);
    }
    for (const k of Object.keys(node.options)) {
      if (k === 'read-only' || k === 'auto-read-only' || k === 'node-name' || k === 'driver') continue;
      if (opts[k] === undefined && !node.children.has(k)) throw new InvalidArgumentError(`Option '${k}' cannot be reset to its default value`);
    }
    for (const role of node.children.keys()) {
      if (opts[role] === undefined && (role === 'file' || role === 'backing') && !node.children.get(role)!.child.autoName) {
        // QEMU requires references to existing children to be repeated
        throw new InvalidArgumentError(`Option '${role}' cannot be reset to its default value`);
      }
    }
    const ro = opts['read-only'];
    if (ro !== undefined && typeof ro !== 'boolean') throw new InvalidArgumentError(`Invalid parameter type for 'read-only', expected: boolean`);
    const readOnly = ro ?? false;
    if (readOnly && !node.readOnly && node.backends().some((b) => !b.readOnly)) {
      throw new StateError(`Cannot make node '${name}' read-only: it has a writable user`);
    }
    plan.push({ node, readOnly });
  }
  for (const { node, readOnly } of plan) {
    await node.setReadOnly(readOnly);
    ctx.log.info('node reopened', { node: node.name, readOnly });
  }
}

async function xBlockdevChange(ctx: QmpContext, parentName: string, childName?: string, nodeName?: string): Promise<void> {
  const parent = ctx.graph.find(parentName);
  if (childName !== undefined && nodeName !== undefined) throw new InvalidArgumentError('The parameters child and node are in conflict');
  if (childName === undefined && nodeName === undefined) throw new InvalidArgumentError('Either child or node must be specified');
  const impl = parent.impl;
  if (nodeName !== undefined) {
    const node = ctx.graph.nodes.get(nodeName);
    if (!node) throw new InvalidArgumentError(`Node '${nodeName}' not found`);
    if (typeof impl.addChild !== 'function') throw new InvalidArgumentError(`The node ${parent.name} does not support adding a child`);
    if (node.parents.size > 0 && node.parentNodes().length > 0) {
      throw new InvalidArgumentError(`The node ${nodeName} already has a parent`);
    }
    await impl.addChild(node);
    ctx.log.info('child added', { parent: parent.name, node: nodeName });
    return;
  }
  if (!parent.children.has(childName!)) throw new InvalidArgumentError(`Node '${parent.name}' does not have child '${childName}'`);
  if (typeof impl.removeChild !== 'function') throw new InvalidArgumentError(`The node ${parent.name} does not support removing a child`);
  await impl.removeChild(childName!);
  ctx.log.info('child removed', { parent: parent.name, child: childName });
}

/** QEMU's bdrv_lookup_bs: a device (named backend) first, then a node-name. */
function lookupBs(ctx: QmpContext, device: string | undefined, nodeName: string | undefined): BlockNode {
  const byDevice = device !== undefined ? ctx.graph.backends.get(device)?.node : undefined;
  if (byDevice) return byDevice;
  const byName = nodeName !== undefined ? ctx.graph.nodes.get(nodeName) : undefined;
  if (byName && byName.isOpen) return byName;
  throw new InvalidArgumentError(`Cannot find device='${device ?? ''}' nor node-name='${nodeName ?? ''}'`);
}

/**
 * block_resize, as QEMU 7.2 orders its checks: the node, the size, the job blockers
 * ("Device '...' is in use", QEMU prints a missing device as "(null)"), then a temporary
 * user taking the resize permission, which every other user must share.
 */
async function blockResize(ctx: QmpContext, device: string | undefined, nodeName: string | undefined, size: number): Promise<void> {
  const node = lookupBs(ctx, device, nodeName);
  if (size < 0) throw new InvalidArgumentError(`Parameter 'size' expects a >0 size`);
  if (node.blockers.size > 0 || node.backingBlocker() !== null) throw new StateError(`Device '${device ?? '(null)'}' is in use`);
  const b = ctx.graph.createBackend(node, { perms: RESIZE_PERMS, user: false, jobHold: true });
  try {
    if (node.readOnly) throw new InvalidArgumentError('Image is read-only');
    if (!node.caps.truncate) throw new InvalidArgumentError('Image format driver does not support resize');
    await node.truncate(size);
  } finally {
    b.closed = true;
    node.parents.delete(b.edge);
    ctx.graph.refreshPermsQuietly([node]);
  }
  ctx.log.info('node resized', { node: node.name, size });
}

export const blockdevCommands: readonly QmpCommand[] = [
  command('block_resize', BLOCK_RESIZE, (ctx, args) =>
    blockResize(ctx, args.device as string | undefined, args['node-name'] as string | undefined, args.size as number),
  ),
  command('blockdev-add', ANY_DICT, (ctx, args) => blockdevAdd(ctx, args)),
  command('blockdev-del', BLOCKDEV_DEL, (ctx, args) => blockdevDel(ctx, args['node-name'])),
  command('blockdev-reopen', BLOCKDEV_REOPEN, (ctx, args) => blockdevReopen(ctx, args.options)),
  command('query-named-block-nodes', QUERY_NAMED_BLOCK_NODES, (ctx, args) => {
    const flat = args.flat ?? false;
    return [...ctx.graph.nodes.values()].reverse().map((n) => blockDeviceInfo(n, flat));
  }),
  command('x-blockdev-change', X_BLOCKDEV_CHANGE, (ctx, args) =>
    xBlockdevChange(ctx, args.parent, args.child, args.node),
  ),
];

/** For commands that name a device the QEMU way ("Device 'x' not found", DeviceNotFound). */
export function findDevice(ctx: QmpContext, name: string): BlockNode {
  const n = ctx.graph.lookup(name);
  if (!n) throw new QmpError('DeviceNotFound', `Device '${name}' not found`);
  return n;
}
