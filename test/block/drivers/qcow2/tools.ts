// QEMU tool helpers for the qcow2 tests. A missing tool fails the test under CI and skips
// it (with the reason) elsewhere.
import { spawnSync } from 'node:child_process';

export function haveTool(name: string): boolean {
  const r = spawnSync(name, ['--version'], { stdio: 'ignore' });
  return r.status === 0;
}

/** Returns false (and skips the test) when the tool is missing outside CI. */
export function needTools(t: { skip(msg: string): void }, ...names: string[]): boolean {
  for (const n of names) {
    if (haveTool(n)) continue;
    if (process.env.CI) throw new Error(`${n} is required under CI but is not installed`);
    t.skip(`${n} is not installed`);
    return false;
  }
  return true;
}

export function run(cmd: string, args: string[], opts: { cwd?: string; allowFail?: boolean } = {}): { status: number; stdout: string; stderr: string } {
  const r = spawnSync(cmd, args, { cwd: opts.cwd, encoding: 'utf8', maxBuffer: 64 << 20 });
  const out = { status: r.status ?? -1, stdout: r.stdout ?? '', stderr: r.stderr ?? '' };
  if (!opts.allowFail && out.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${out.status}): ${out.stderr}${out.stdout}`);
  return out;
}

export interface QemuCheck {
  'check-errors': number;
  corruptions?: number;
  leaks?: number;
  'image-end-offset'?: number;
  'allocated-clusters'?: number;
}

/** qemu-img check -U --output=json (-U: the image may be open here; exit 2/3: still JSON). */
export function qemuCheck(path: string): QemuCheck {
  const r = run('qemu-img', ['check', '-U', '--output=json', path], { allowFail: true });
  if (r.status !== 0 && r.status !== 2 && r.status !== 3) throw new Error(`qemu-img check failed (${r.status}): ${r.stderr}`);
  return JSON.parse(r.stdout) as QemuCheck;
}
