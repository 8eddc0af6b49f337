// External tools for interop tests: run asynchronously (an in-process server must keep
// serving while the tool runs), fail when missing under CI, skip otherwise.
import { execFile, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import assert from 'node:assert/strict';
import type { TestContext } from 'node:test';

export function haveTool(name: string): boolean {
  return spawnSync('which', [name]).status === 0;
}

/** true when every tool is there; otherwise fails (CI) or skips the test. */
export function requireTools(t: TestContext, ...names: string[]): boolean {
  const missing = names.filter((n) => !haveTool(n));
  if (missing.length === 0) return true;
  if (process.env.CI) assert.fail(`required tools missing: ${missing.join(', ')}`);
  t.skip(`not installed: ${missing.join(', ')}`);
  return false;
}

export function run(cmd: string, args: string[], opts: { timeoutMs?: number } = {}): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { timeout: opts.timeoutMs ?? 60_000, maxBuffer: 64 << 20, encoding: 'utf8' }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${cmd} ${args.join(' ')} failed: ${err.message}\n${stderr}`));
      else resolve({ stdout, stderr });
    });
  });
}

/** Starts a long-running tool; killed when the test ends. */
export function start(t: TestContext, cmd: string, args: string[]): ChildProcess {
  const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  t.after(async () => {
    if (child.exitCode === null && child.signalCode === null) {
      // nbdkit waits for its clients on SIGTERM; do not let a test hang on that.
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 3000);
      await exited;
      clearTimeout(timer);
    }
  });
  return child;
}

/** Polls until `probe` succeeds (bounded). */
export async function waitFor(probe: () => Promise<boolean> | boolean, what: string, tries = 100): Promise<void> {
  for (let i = 0; i < tries; i++) {
    if (await probe()) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`timed out waiting for ${what}`);
}
