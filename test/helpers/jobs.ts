// Helpers for job tests: an event recorder, a seeded random source, waiting for events.
import type { JobManager } from '../../src/jobs/job.js';

export interface RecordedEvent {
  name: string;
  data: Record<string, unknown>;
}

export function recordEvents(mgr: JobManager): RecordedEvent[] {
  const out: RecordedEvent[] = [];
  mgr.on('event', (name: string, data: Record<string, unknown>) => out.push({ name, data }));
  return out;
}

/** Resolves with the data of the next event `name` (optionally matching `pred`). */
export function nextEvent(mgr: JobManager, name: string, pred: (d: Record<string, unknown>) => boolean = () => true): Promise<Record<string, unknown>> {
  return new Promise((resolve) => {
    const f = (n: string, d: Record<string, unknown>): void => {
      if (n === name && pred(d)) {
        mgr.off('event', f);
        resolve(d);
      }
    };
    mgr.on('event', f);
  });
}

/** xorshift32: deterministic pseudo-random numbers for reproducible I/O patterns. */
export function rng(seed: number): (n: number) => number {
  let x = seed >>> 0 || 1;
  return (n: number) => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x % n;
  };
}

/** A buffer of `length` bytes derived from `seed` (never all zero). */
export function fill(seed: number, length: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i++) b[i] = ((seed * 31 + i * 7) & 0xff) | 1;
  return b;
}

export function statuses(events: RecordedEvent[], id: string): string[] {
  return events.filter((e) => e.name === 'JOB_STATUS_CHANGE' && e.data['id'] === id).map((e) => String(e.data['status']));
}

/** Polls `cond` on the event loop (bounded). */
export async function until(cond: () => boolean, what: string, maxTurns = 200000): Promise<void> {
  for (let i = 0; i < maxTurns; i++) {
    if (cond()) return;
    await new Promise((r) => setImmediate(r));
  }
  throw new Error(`timed out waiting for ${what}`);
}

import type { BlockGraph } from '../../src/block/graph.js';
import type { BlockNode } from '../../src/block/node.js';
import type { OptionDict } from '../../src/block/options.js';

/** Opens a node the way blockdev-add does (it stays until deleted, like a user's node). */
export function addNode(g: BlockGraph, opts: OptionDict): Promise<BlockNode> {
  return g.open(opts, { monitorOwned: true });
}

import { spawnSync } from 'node:child_process';

/**
 * True if `tool` runs. When it does not: fails under CI (process.env.CI), else skips the
 * test with a reason.
 */
export function haveTool(t: { skip(msg: string): void }, tool: string): boolean {
  const r = spawnSync(tool, ['--version'], { encoding: 'utf8' });
  if (r.status === 0) return true;
  if (process.env['CI']) throw new Error(`${tool} is required (CI is set) but could not run`);
  t.skip(`${tool} is not installed`);
  return false;
}

/** Runs a command; throws with its stderr when it fails. */
export function run(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed: ${r.stderr || r.error?.message}`);
  return r.stdout;
}
