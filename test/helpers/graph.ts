// Test helpers: graphs on the full driver registry, temporary folders.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BlockGraph } from '../../src/block/graph.js';
import { createRegistry } from '../../src/block/registry.js';

export function newGraph(): BlockGraph {
  return new BlockGraph(createRegistry());
}

export function tempDir(t: { after(fn: () => void): void }, prefix = 'lockstep-test-'): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

export function pattern(byte: number, length: number): Buffer {
  return Buffer.alloc(length, byte);
}
