// What each writing `lockstep img` subcommand wrote, read back by QEMU's tools after the
// process has exited: the guest-visible bytes (qemu-img convert to raw, compared exactly
// with the expected bytes and with what qemu-img itself produces from the same command)
// and a clean image (qemu-img check: no leaks, no corruptions, no dirty flag).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { tempDir } from '../helpers/graph.js';

const LOCKSTEP = fileURLToPath(new URL('../../../bin/lockstep', import.meta.url));
const have = spawnSync('qemu-img', ['--version']).error === undefined && spawnSync('qemu-io', ['--version']).error === undefined;
const needQemu = have || process.env.CI ? {} : { skip: 'qemu-img/qemu-io are not installed' };

function run(cmd: string, args: string[], cwd: string): { stdout: string; stderr: string; status: number | null } {
  const r = spawnSync(cmd, args, { encoding: 'utf8', cwd });
  if (r.error) throw r.error;
  return { stdout: r.stdout, stderr: r.stderr, status: r.status };
}
const lockstepImg = (args: string[], cwd: string) => run(process.execPath, [LOCKSTEP, 'img', ...args], cwd);
const qemuImg = (args: string[], cwd: string) => run('qemu-img', args, cwd);

function ok(r: { stdout: string; stderr: string; status: number | null }, what: string): void {
  assert.equal(r.status, 0, `${what}: ${r.stdout}${r.stderr}`);
}

/** The guest-visible bytes of an image, as qemu-img reads them. */
function contents(dir: string, image: string, format = 'qcow2'): Buffer {
  const out = `${image}.readback.raw`;
  ok(qemuImg(['convert', '-f', format, '-O', 'raw', image, out], dir), `qemu-img convert ${image}`);
  return readFileSync(join(dir, out));
}

function clean(dir: string, image: string): void {
  const r = qemuImg(['check', '--output=json', image], dir);
  ok(r, `qemu-img check ${image}`);
  const chk = JSON.parse(r.stdout) as Record<string, number>;
  assert.equal(chk.leaks ?? 0, 0, `${image}: ${r.stdout}`);
  assert.equal(chk.corruptions ?? 0, 0, `${image}: ${r.stdout}`);
  const info = JSON.parse(qemuImg(['info', '--output=json', image], dir).stdout) as { 'format-specific'?: { data?: Record<string, unknown> } };
  const data = info['format-specific']?.data;
  if (data && 'lazy-refcounts' in data) assert.notEqual(data['dirty-flag'], true, `${image} is marked clean`);
}

const MiB = 1 << 20;

test('bench -w on qcow2: every cache mode, depth and flush interval keeps what it wrote, like qemu-img bench', needQemu, (t) => {
  const dir = tempDir(t);
  const lazy4k = ['-o', 'lazy_refcounts=on,cluster_size=4k'];
  // [create options, bench options]: each cache mode once, over both layouts
  const variants: Array<[string[], string[]]> = [
    [[], ['-d', '1']],
    [lazy4k, ['-d', '16']],
    [[], ['-d', '16', '-t', 'writethrough']],
    [lazy4k, ['-d', '4', '-t', 'unsafe']],
    [lazy4k, ['-d', '8', '--flush-interval=8', '-t', 'writeback']],
    [[], ['-d', '8', '--flush-interval=8', '--no-drain', '-t', 'writethrough']],
  ];
  {
    for (const [create, v] of variants) {
      const what = JSON.stringify([...create, ...v]);
      ok(qemuImg(['create', '-q', '-f', 'qcow2', ...create, 'l.qcow2', '8M'], dir), 'create');
      copyFileSync(join(dir, 'l.qcow2'), join(dir, 'q.qcow2'));
      // 24 requests of 64 KiB every 192 KiB from 4 KiB: unaligned to clusters, past 1 L2 table
      const args = ['bench', '-w', '-f', 'qcow2', '-c', '24', '-s', '64k', '-S', '192k', '-o', '4k', '--pattern=51', ...v];
      const l = lockstepImg([...args, 'l.qcow2'], dir);
      ok(l, `lockstep img ${what}`);
      ok(qemuImg([...args, 'q.qcow2'], dir), `qemu-img ${what}`);
      const expected = Buffer.alloc(8 * MiB);
      for (let i = 0; i < 24; i++) expected.fill(0x33, 4096 + i * 196608, 4096 + i * 196608 + 65536);
      const got = contents(dir, 'l.qcow2');
      assert.ok(got.equals(expected), `${what}: lockstep's image reads back the pattern where the requests went`);
      assert.ok(contents(dir, 'q.qcow2').equals(got), `${what}: qemu-img's image reads the same`);
      clean(dir, 'l.qcow2');
    }
  }
});

test('bench -w on raw with -t writethrough and unsafe: the data is in the file', needQemu, (t) => {
  const dir = tempDir(t);
  for (const mode of ['writethrough', 'unsafe', 'writeback']) {
    writeFileSync(join(dir, 'r.img'), Buffer.alloc(MiB));
    ok(lockstepImg(['bench', '-w', '-f', 'raw', '-t', mode, '-c', '4', '-s', '4k', '-S', '128k', '--pattern=9', 'r.img'], dir), mode);
    const expected = Buffer.alloc(MiB);
    for (let i = 0; i < 4; i++) expected.fill(9, i * 131072, i * 131072 + 4096);
    assert.ok(readFileSync(join(dir, 'r.img')).equals(expected), mode);
  }
  const bad = lockstepImg(['bench', '-w', '-f', 'raw', '-t', 'sometimes', 'r.img'], dir);
  assert.equal(bad.status, 1);
  assert.equal(bad.stderr, 'lockstep img: Invalid cache option: sometimes\n');
});

test('create, convert (every cache mode, -n), commit (-d, -t) and rebase -u: QEMU reads back what lockstep wrote', needQemu, (t) => {
  const dir = tempDir(t);
  const src = Buffer.alloc(4 * MiB);
  for (let i = 0; i < src.length; i += 300 * 1024) src.fill((i >> 10) & 0xff || 1, i, i + 70000);
  writeFileSync(join(dir, 'src.raw'), src);

  // create with a backing file: the new overlay reads the base's bytes
  ok(lockstepImg(['convert', '-f', 'raw', '-O', 'qcow2', 'src.raw', 'base.qcow2'], dir), 'convert to base');
  assert.ok(contents(dir, 'base.qcow2').equals(src));
  clean(dir, 'base.qcow2');
  ok(lockstepImg(['create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], dir), 'create overlay');
  assert.ok(contents(dir, 'top.qcow2').equals(src));

  for (const mode of ['writeback', 'writethrough', 'unsafe']) {
    const out = `c-${mode}.qcow2`;
    ok(lockstepImg(['convert', '-t', mode, '-f', 'raw', '-O', 'qcow2', 'src.raw', out], dir), `convert -t ${mode}`);
    assert.ok(contents(dir, out).equals(src), `convert -t ${mode}`);
    clean(dir, out);
  }
  // -n: into an existing image (lazy refcounts: the dirty flag must be cleared at close)
  ok(qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', 'existing.qcow2', '4M'], dir), 'create existing');
  ok(lockstepImg(['convert', '-n', '-t', 'writethrough', '-f', 'raw', '-O', 'qcow2', 'src.raw', 'existing.qcow2'], dir), 'convert -n');
  assert.ok(contents(dir, 'existing.qcow2').equals(src));
  clean(dir, 'existing.qcow2');
  ok(lockstepImg(['convert', '-f', 'qcow2', '-O', 'raw', 'existing.qcow2', 'back.raw'], dir), 'convert to raw');
  assert.ok(readFileSync(join(dir, 'back.raw')).equals(src));

  // commit: the overlay's data lands in the base; -d keeps the overlay's copy
  const expected = Buffer.from(src);
  ok(run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 1000k 200k', '-c', 'write -P 0x6b 3M 64k', 'top.qcow2'], dir), 'qemu-io write');
  expected.fill(0x5a, 1000 * 1024, 1200 * 1024).fill(0x6b, 3 * MiB, 3 * MiB + 65536);
  copyFileSync(join(dir, 'base.qcow2'), join(dir, 'base-d.qcow2'));
  copyFileSync(join(dir, 'top.qcow2'), join(dir, 'top-d.qcow2'));
  ok(lockstepImg(['rebase', '-u', '-b', 'base-d.qcow2', '-F', 'qcow2', 'top-d.qcow2'], dir), 'rebase -u');
  assert.ok(contents(dir, 'top-d.qcow2').equals(expected), 'after rebase -u the overlay reads the same');
  ok(lockstepImg(['commit', '-q', '-t', 'writethrough', 'top.qcow2'], dir), 'commit');
  assert.ok(contents(dir, 'base.qcow2').equals(expected), 'the base holds the committed data');
  assert.equal(qemuImg(['map', '--output=json', 'top.qcow2'], dir).stdout.includes('"data": true, "zero": false, "offset": '), false);
  assert.ok(contents(dir, 'top.qcow2').equals(expected), 'the emptied overlay reads through to the base');
  clean(dir, 'base.qcow2');
  clean(dir, 'top.qcow2');
  ok(lockstepImg(['commit', '-q', '-d', 'top-d.qcow2'], dir), 'commit -d');
  assert.ok(contents(dir, 'base-d.qcow2').equals(expected));
  assert.ok(contents(dir, 'top-d.qcow2').equals(expected));
  const m = JSON.parse(qemuImg(['map', '--output=json', 'top-d.qcow2'], dir).stdout) as Array<{ depth: number; data: boolean; start: number }>;
  assert.ok(m.some((e) => e.depth === 0 && e.data && e.start <= 3 * MiB), '-d keeps the overlay allocated');
  clean(dir, 'base-d.qcow2');
  clean(dir, 'top-d.qcow2');
});
