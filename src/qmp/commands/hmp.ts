// human-monitor-command: the HMP commands block replication recipes use. Output is returned in
// the reply as HMP prints it (lines end with "\r\n"); errors are output too, as in QEMU, and
// the QMP command itself succeeds.
//   qemu-io [-d] DEVICE "CMD"    run a qemu-io command on a node (-d: device names only)
//   drive_add -n BUDDY OPTIONS   add a node from keyval options (no guest device)
//   drive_del NODE               delete a node added by drive_add / blockdev-add
//   info block [-n] [-v] [DEV]   list devices (named backends), or nodes with -n

import { WATCH_PERMS } from '../../block/permissions.js';
import type { Backend } from '../../block/backend.js';
import type { BlockNode } from '../../block/node.js';
import { errorMessage } from '../../errors.js';
import { parseOptionString } from '../../util/keyval.js';
import { command, type QmpCommand, type QmpContext } from '../dispatch.js';
import { HUMAN_MONITOR_COMMAND } from '../schema/misc.js';
import { filenameOf } from './blockdev.js';

/** The qemu-io engine (src/cli/io-commands.ts): runs one command line, writing output. */
export type IoCommandRunner = (backend: Backend, line: string, out: (s: string) => void) => Promise<boolean>;

/** Splits an HMP command line: words, "double" or 'single' quoted strings with \ escapes. */
export function splitHmpArgs(line: string): string[] {
  const out: string[] = [];
  let i = 0;
  while (i < line.length) {
    while (i < line.length && /\s/.test(line[i]!)) i++;
    if (i >= line.length) break;
    const q = line[i];
    let word = '';
    if (q === '"' || q === "'") {
      i++;
      while (i < line.length && line[i] !== q) {
        if (line[i] === '\\' && i + 1 < line.length) i++;
        word += line[i];
        i++;
      }
      if (i >= line.length) throw new Error('unterminated string literal');
      i++;
    } else {
      while (i < line.length && !/\s/.test(line[i]!)) word += line[i++];
    }
    out.push(word);
  }
  return out;
}

type Hmp = (ctx: QmpContext, args: string[]) => Promise<string> | string;

const HMP: Record<string, { help: string; run: Hmp }> = {
  'qemu-io': { help: 'qemu-io [-d] [device] "[command]" -- run a qemu-io command on a block device', run: qemuIo },
  drive_add: { help: 'drive_add [-n] [[<domain>:]<bus>:]<slot> [file=file][,if=type][,bus=n]... -- add drive to PCI storage controller', run: driveAdd },
  drive_del: { help: 'drive_del device -- remove host block device', run: driveDel },
  info: { help: 'info [subcommand] -- show various information about the system state', run: info },
  help: { help: 'help|? [cmd] -- show the help', run: () => Object.values(HMP).map((c) => c.help + '\n').join('') },
};

/**
 * Where the monitor's writer enters the graph for `node`: above the implicit filters that
 * jobs insert over it (mirror_top, commit_top, copy-before-write). QEMU tracks a job's
 * dirty ranges on the node itself, so any writer is seen; lockstep tracks them in those
 * filters, so a writer must come in above them.
 */
export function entryNode(node: BlockNode): BlockNode {
  for (;;) {
    const above = node.parentNodes().find((p) => p.autoName && p.isOpen && p.caps.filter === true && p.file === node);
    if (!above) return node;
    node = above;
  }
}

async function qemuIo(ctx: QmpContext, args: string[]): Promise<string> {
  let deviceOnly = false;
  if (args[0] === '-d') {
    deviceOnly = true;
    args = args.slice(1);
  }
  if (args.length !== 2) return 'qemu-io: expected a device and a quoted command\n';
  const [device, cmdline] = args as [string, string];
  let node: BlockNode | null;
  if (deviceOnly) {
    node = ctx.graph.backends.get(device)?.node ?? null;
    if (!node) return `Error: Device '${device}' not found\n`;
  } else {
    node = ctx.graph.lookup(device);
    if (!node) return `Error: Cannot find device='' nor node-name='${device}'\n`;
  }
  const runner = ctx.services.runIoCommand;
  if (!runner) return 'Error: qemu-io is not available in this build\n';
  // QEMU's HMP qemu-io starts with no permissions (a write command takes them per command)
  const backend = ctx.graph.createBackend(entryNode(node), { readOnly: node.readOnly, user: false, perms: WATCH_PERMS });
  let out = '';
  try {
    await runner(backend, cmdline, (s) => {
      out += s;
    });
  } catch (e) {
    out += `${errorMessage(e)}\n`;
  } finally {
    ctx.graph.releaseBackend(backend);
  }
  return out;
}

async function driveAdd(ctx: QmpContext, args: string[]): Promise<string> {
  if (args[0] !== '-n') return 'drive_add without -n is not supported: lockstep has no guest devices to attach a drive to\n';
  if (args.length !== 3) return 'drive_add: expected -n BUDDY OPTIONS\n';
  const { dict, keyval } = parseOptionString(args[2]!);
  if (typeof dict['node-name'] !== 'string') return "'node-name' needs to be specified\n";
  const node = await ctx.graph.open(dict, { keyval, monitorOwned: true });
  ctx.log.info('node added', { node: node.name, driver: node.driver.name, via: 'drive_add' });
  return '';
}

async function driveDel(ctx: QmpContext, args: string[]): Promise<string> {
  if (args.length !== 1) return 'drive_del: expected one device\n';
  const name = args[0]!;
  if (!ctx.graph.nodes.has(name)) return `Device '${name}' not found\n`;
  await ctx.graph.deleteNode(name);
  ctx.log.info('node deleted', { node: name, via: 'drive_del' });
  return '';
}

function describeNode(node: BlockNode, label: string, verbose: boolean): string {
  let s = `${label}: ${filenameOf(node)} (${node.driver.name}${node.readOnly ? ', read-only' : ''})\n`;
  s += `    Cache mode:       writeback\n`;
  let depth = 0;
  for (let b = node.backing; b; b = b.backing) depth++;
  if (node.backing) s += `    Backing file:     ${filenameOf(node.backing)} (chain depth: ${depth})\n`;
  if (verbose) s += `    Node:             ${node.name}, ${node.getLength()} bytes\n`;
  return s;
}

function info(ctx: QmpContext, args: string[]): string {
  const what = args[0];
  if (what !== 'block') return what === undefined ? HMP.info!.help + '\n' : `unknown info subcommand '${what}'\n`;
  let nodes = false;
  let verbose = false;
  let device: string | undefined;
  for (const a of args.slice(1)) {
    if (a === '-n') nodes = true;
    else if (a === '-v') verbose = true;
    else device = a;
  }
  let out = '';
  if (nodes) {
    for (const n of [...ctx.graph.nodes.values()].reverse()) {
      if (device === undefined || n.name === device) out += describeNode(n, n.name, verbose);
    }
    return out;
  }
  const lines: string[] = [];
  for (const [name, b] of ctx.graph.backends) {
    if (device !== undefined && device !== name) continue;
    lines.push(describeNode(b.node, `${name} (${b.node.name})`, verbose));
  }
  if (device !== undefined && lines.length === 0) return `Device '${device}' not found\n`;
  return lines.join('\n');
}

async function humanMonitorCommand(ctx: QmpContext, line: string): Promise<string> {
  let words: string[];
  try {
    words = splitHmpArgs(line);
  } catch (e) {
    return toHmp(`${errorMessage(e)}\n`);
  }
  const name = words[0];
  if (name === undefined) return '';
  const cmd = HMP[name === '?' ? 'help' : name];
  if (!cmd) return toHmp(`unknown command: '${name}'\n`);
  try {
    return toHmp(await cmd.run(ctx, words.slice(1)));
  } catch (e) {
    return toHmp(`${errorMessage(e)}\n`);
  }
}

/** HMP output uses CRLF line ends. */
function toHmp(s: string): string {
  return s.replace(/\r?\n/g, '\r\n');
}

export const hmpCommands: readonly QmpCommand[] = [
  command('human-monitor-command', HUMAN_MONITOR_COMMAND, (ctx, args) => humanMonitorCommand(ctx, args['command-line'])),
];
