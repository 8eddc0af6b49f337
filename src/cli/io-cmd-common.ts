// Shared pieces of the qemu-io command engine: the command table's types, qemu-io's limits
// and the argument helpers every data command uses.

import { strerror } from '../errors.js';
import type { Backend } from '../block/backend.js';
import { parseIoNumber } from './io-parse.js';

export interface IoCommandOptions {
  /** where qemu-io writes to stderr; defaults to `out` (the monitor has one stream) */
  err?: (s: string) => void;
  /** prefix of error_report()-style lines ("lockstep io: "); none by default */
  errorPrefix?: string;
}

/** QEMU's BDRV_REQUEST_MAX_BYTES: the largest single request qemu-io accepts. */
export const MAX_REQUEST_BYTES = 2147483136;

export const DEFAULT_WRITE_PATTERN = 0xcd;

export interface Ctx {
  backend: Backend;
  out: (s: string) => void;
  err: (s: string) => void;
  errorPrefix: string;
}

export interface CommandDef {
  name: string;
  altname?: string;
  /** getopt(3) option string */
  optstring: string;
  argmin: number;
  /** -1: unbounded */
  argmax: number;
  args: string;
  oneline: string;
  help?: string;
  /** needs write permission */
  writes?: boolean;
  run(ctx: Ctx, opts: Map<string, string>, args: string[]): Promise<boolean>;
}


export function errnoText(e: unknown): string {
  return strerror(e);
}

export function elapsedSince(start: bigint): number {
  return Number(process.hrtime.bigint() - start) / 1e9;
}

export function usageLine(def: CommandDef): string {
  return `${def.name} ${def.args} -- ${def.oneline}\n`;
}

/** Parses `off len` for read/write/discard; prints qemu-io's messages on failure. */
export function parseOffLen(ctx: Ctx, def: CommandDef, args: string[]): { offset: number; count: number; countText: string } | null {
  if (args.length !== 2) {
    ctx.out(usageLine(def));
    return null;
  }
  let offset: number;
  let count: number;
  try {
    offset = parseIoNumber(args[0]!);
    count = parseIoNumber(args[1]!);
  } catch (e) {
    ctx.out(`${(e as Error).message}\n`);
    return null;
  }
  if (count > MAX_REQUEST_BYTES) {
    ctx.out(`length cannot exceed ${MAX_REQUEST_BYTES}, given ${args[1]}\n`);
    return null;
  }
  return { offset, count, countText: args[1]! };
}


/** Parses `off len [len..]` of readv/writev; prints qemu-io's messages on failure. */
export function parseVector(ctx: Ctx, def: CommandDef, args: string[]): { offset: number; count: number } | null {
  if (args.length < 2) {
    ctx.out(usageLine(def));
    return null;
  }
  let offset: number;
  let count = 0;
  try {
    offset = parseIoNumber(args[0]!);
    for (const a of args.slice(1)) {
      const len = parseIoNumber(a);
      if (len > MAX_REQUEST_BYTES) {
        ctx.out(`Argument '${a}' exceeds maximum size ${MAX_REQUEST_BYTES}\n`);
        return null;
      }
      count += len;
      if (count > MAX_REQUEST_BYTES) {
        ctx.out(`The total number of bytes exceed the maximum size ${MAX_REQUEST_BYTES}\n`);
        return null;
      }
    }
  } catch (e) {
    ctx.out(`${(e as Error).message}\n`);
    return null;
  }
  return { offset, count };
}
