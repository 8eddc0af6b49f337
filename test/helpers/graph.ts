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
  // After hooks run in the order registered, so this one usually runs before the test's own
  // (a pair's stop): a daemon still running may add a file meanwhile (ENOTEMPTY), retried.
  // It never throws: a failed hook skips the hooks after it, and a pair left unstopped keeps
  // the test process alive for good (seen in test/pair/liveness).
  t.after(() => {
    try {
      rmSync(dir, { recursive: true, force: true, maxRetries: 20, retryDelay: 50 });
    } catch (e) {
      process.stderr.write(`tempDir: could not remove ${dir}: ${(e as Error).message}\n`);
    }
  });
  return dir;
}

export function pattern(byte: number, length: number): Buffer {
  return Buffer.alloc(length, byte);
}
