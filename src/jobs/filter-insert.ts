// Shared by the jobs that put a filter above their source (backup, mirror, active commit):
// inserting it without a cycle and without losing requests already in flight, and checking
// the error-policy arguments.

import { InvalidArgumentError } from '../errors.js';
import { BlockNode, type Edge } from '../block/node.js';
import { ON_ERROR_VALUES, type OnError } from './job-status.js';

export function checkOnError(name: string, v: OnError | undefined): void {
  if (v !== undefined && !ON_ERROR_VALUES.includes(v)) throw new InvalidArgumentError(`Parameter '${name}' does not accept value '${String(v)}'`);
}

/**
 * Inserts `filter` (whose file child is `below`) above `below`. Parents that the filter
 * itself reaches (a fleecing target whose backing is `below`) keep pointing at `below`:
 * re-pointing them would make a cycle.
 */
export function insertFilterAbove(filter: BlockNode, below: BlockNode): void {
  const graph = filter.graph;
  const except: Edge[] = [];
  for (const e of below.parents) {
    if (e.parent === filter || (e.parent instanceof BlockNode && graph.reaches(filter, e.parent))) except.push(e);
  }
  graph.replaceNode(below, filter, except);
}

/**
 * Inserts the filter, then waits for the requests already in flight on `below` (they were
 * issued before the filter existed, so nothing copied or tracked them) before anything else
 * reaches `below`: new requests arrive through the filter, and the hold is taken in the same
 * turn as the insertion.
 */
export function insertFilterDrained(filter: BlockNode, below: BlockNode): Promise<void> {
  insertFilterAbove(filter, below);
  const held = below.tracker.hold(); // takes the hold now, in this turn
  return held.then((release) => release());
}
