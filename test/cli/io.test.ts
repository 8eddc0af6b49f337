// `lockstep io` as a subprocess against real raw files, side by side with Debian's qemu-io
// on copies of the same file: the same output lines (timing values aside), the same exit
// codes, the same bytes on disk; and each tool reading what the other wrote.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createRegistry } from '../../src/block/registry.js';
import { loadNative } from '../../src/util/native.js';
import { tempDir } from '../helpers/graph.js';
import { createQcow2 } from '../../src/block/drivers/qcow2/create.js';

const LOCKSTEP = fileURLToPath(new URL('../../../bin/lockstep', import.meta.url));

interface Run {
  stdout: string;
  stderr: string;
  status: number | null;
}

function lockstepIo(args: string[], input?: string): Run {
  const r = spawnSync(process.execPath, [LOCKSTEP, 'io', ...args], { encoding: 'utf8', input: input ?? '' });
  return { stdout: r.stdout, stderr: r.stderr, status: r.status };
}

function qemuIo(args: string[]): Run | null {
  const r = spawnSync('qemu-io', args, { encoding: 'utf8', input: '' });
  if (r.error) return null;
  return { stdout: r.stdout, stderr: r.stderr, status: r.status };
}

const haveQemuIo = qemuIo(['--version']) !== null;
/** Interop tests fail without qemu-io in CI, and skip with a reason elsewhere. */
const needQemuIo = haveQemuIo || process.env.CI ? {} : { skip: 'qemu-io is not installed' };

/** The statistics line with its timing values replaced (the format is checked apart). */
const STATS_RE = /^(\d+(?:\.\d+)? (?:bytes|KiB|MiB|GiB), \d+ ops; )(\d\d\.\d\d sec|\d+:\d\d:\d\d\.\d\d) \(\d+(?:\.\d+)? (?:bytes|KiB|MiB|GiB|TiB)\/sec and \d+\.\d{4} ops\/sec\)$/;

function normalise(text: string): string {
  return text
    .split('\n')
    .map((l) => {
      const m = STATS_RE.exec(l);
      return m ? `${m[1]}TIME` : l;
    })
    .join('\n');
}

function rawImage(dir: string, name: string, size: number, fill = 0): string {
  const p = join(dir, name);
  writeFileSync(p, Buffer.alloc(size, fill));
  return p;
}

test('lockstep io writes what qemu-io reads back, and the bytes on disk are exact', needQemuIo, (t) => {
  const dir = tempDir(t);
  const img = rawImage(dir, 'a.img', 1 << 20);
  const w = lockstepIo(['-f', 'raw', '-c', 'write -P 0xab 0 4k', '-c', 'write -P 0x12 64k 3k', '-c', 'write -z 4k 4k', img]);
  assert.equal(w.status, 0, w.stderr);
  const expected = Buffer.alloc(1 << 20);
  expected.fill(0xab, 0, 4096);
  expected.fill(0x12, 65536, 65536 + 3072);
  assert.ok(readFileSync(img).equals(expected));
  const r = qemuIo(['-f', 'raw', '-c', 'read -P 0xab 0 4k', '-c', 'read -P 0 4k 60k', '-c', 'read -P 0x12 64k 3k', img])!;
  assert.equal(r.status, 0, r.stdout + r.stderr);
  assert.doesNotMatch(r.stdout, /verification failed/);
});

test('lockstep io reads what qemu-io wrote, and reports a mismatch like qemu-io', needQemuIo, (t) => {
  const dir = tempDir(t);
  const img = rawImage(dir, 'a.img', 1 << 20);
  const w = qemuIo(['-f', 'raw', '-c', 'write -P 0x5c 8k 8k', '-c', 'write -P 0x11 1020k 4k', img])!;
  assert.equal(w.status, 0, w.stdout + w.stderr);
  const ok = lockstepIo(['-f', 'raw', '-c', 'read -P 0x5c 8k 8k', '-c', 'read -P 0x11 1020k 4k', '-c', 'read -P 0 0 8k', img]);
  assert.equal(ok.status, 0, ok.stdout + ok.stderr);
  const bad = lockstepIo(['-f', 'raw', '-c', 'read -P 0x5c 4k 8k', img]);
  assert.equal(bad.status, 1);
  assert.equal(bad.stdout.split('\n')[0], 'Pattern verification failed at offset 4096, 8192 bytes');
  // -s/-l narrow the verified range: the mismatch is reported at its absolute offset
  const narrow = lockstepIo(['-f', 'raw', '-c', 'read -P 0x5c -s 2k -l 1k 4k 8k', img]);
  assert.equal(narrow.status, 1);
  assert.equal(narrow.stdout.split('\n')[0], 'Pattern verification failed at offset 6144, 1024 bytes');
});

/** Commands whose output and exit status must equal qemu-io's on the same image. */
const SAME_AS_QEMU: string[][] = [
  ['write -P 0xab 0 4k', 'read -P 0xab 0 4k', 'read -P 0xac 0 4k'],
  ['write -P 0x41 0 21', 'read -v 0 33'],
  ['read -P 0xab -v 0 16'],
  ['length', 'info', 'map', 'alloc 0 1M', 'alloc 64k', 'alloc 0 2M'],
  ['write -z -u 8k 4k', 'write -f 0 512', 'write 0 0', 'read 1M 0', 'discard 0 0', 'flush'],
  ['read 1.5k 512', 'read 0x100 1', 'read 1b 1', 'read 1K 1', 'read +1 1', 'read -- 0 1', 'read 0 4k -q', 'read -qv 0 4'],
  ['read 2M 4k'],
  ['read 1048575 2'],
  ['write 1M 1'],
  ['discard 2M 1'],
  ['read -1 5'],
  ['read 0 -1'],
  ['read abc 4'],
  ['read 1e3 1'],
  ['read 0.5 1'],
  ['read 1k1 1'],
  ['read 99999999999999999999 1'],
  ['read 0'],
  ['read -P'],
  ['length 1'],
  ['map 1'],
  ['foo'],
  ['read -x 0 1'],
  ['read 0 1 2'],
  ['read 0 2G'],
  ['write -P 0x100 0 1'],
  ['write -Pab 0 1'],
  ['write -z -P 1 0 1'],
  ['write -u 0 4k'],
  ['write -n 0 4k'],
  ['write -P 0xcd -s'],
  ['read -s 0 0 1'],
  ['read -P 0 -l 2k 0 1k'],
  ['read -P 0 -s 2k 0 1k'],
  ['read -P 0 -s abc 0 1k'],
  ['read -P 0 -s 1k 0 1k', 'read -P 0 -s 1023 -l 1 0 1k', 'read -P 0 -l 0 0 1'],
  ['write -P 010 0 4', 'read -P 8 0 4'],
  ['write -P -1 0 4'],
  ['read -b 0 512'],
  ['write -c 0 64k'],
  ['help read'],
  ['writev -P 5 0 512 1k', 'readv -P 5 0 512 1k', 'readv -P 6 0 512', 'readv -v 0 512 16', 'writev -f 0 100', 'readv -q 0 4'],
  ['readv 0 abc'],
  ['readv 0 3G'],
  ['readv 0 1G 1G 1G'],
  ['readv 2M 512'],
  ['readv -x 0 1'],
  ['readv 0'],
  ['writev -P 300 0 1'],
  ['truncate 2M', 'length', 'write -P 9 1536k 4k', 'truncate 1M', 'length', 't 1536k', 'read -P 0 1M 512k'],
  ['truncate -m bogus 2M'],
  ['truncate -1'],
  ['truncate'],
  ['sleep 10', 'sleep 0x5'],
  ['sleep x'],
  ['sleep 1 2'],
];

/** Discard frees space and reads back zeroes when the file driver can punch holes. */
const SAME_WITH_NATIVE: string[][] = [['discard 64k 64k', 'read -P 0 64k 64k', 'read -P 0xcd 0 64k'], ['discard -q 4k 8k', 'map']];

test('output lines and exit codes match qemu-io 7.2 command by command', needQemuIo, (t) => {
  const dir = tempDir(t);
  const base = rawImage(dir, 'base.img', 1 << 20, 0xcd);
  for (const cmds of [...SAME_AS_QEMU, ...(loadNative() ? SAME_WITH_NATIVE : [])]) {
    const a = join(dir, 'q.img');
    const b = join(dir, 'l.img');
    copyFileSync(base, a);
    copyFileSync(base, b);
    const args = cmds.flatMap((c) => ['-c', c]);
    const q = qemuIo(['-f', 'raw', ...args, a])!;
    const l = lockstepIo(['-f', 'raw', ...args, b]);
    const what = JSON.stringify(cmds);
    if (cmds[0] === 'help read') {
      // our extended help lists only what lockstep supports; the usage line is the same
      assert.equal(l.stdout.split('\n')[0], q.stdout.split('\n')[0], what);
    } else {
      assert.equal(normalise(l.stdout), normalise(q.stdout), `stdout of ${what}`);
      assert.equal(l.stderr.replace(/^lockstep io: /gm, 'qemu-io: '), q.stderr, `stderr of ${what}`);
    }
    assert.equal(l.status, q.status, `exit status of ${what}`);
    assert.ok(readFileSync(a).equals(readFileSync(b)), `image content after ${what}`);
  }
});

test('the statistics lines have qemu-io format; -q suppresses them; -C is machine-readable', (t) => {
  const dir = tempDir(t);
  const img = rawImage(dir, 'a.img', 1 << 20);
  const r = lockstepIo(['-f', 'raw', '-c', 'write 0 4k', '-c', 'read 0 64k', '-c', 'read -q 0 4k', '-c', 'write -C 0 512', img]);
  assert.equal(r.status, 0, r.stderr);
  const lines = r.stdout.split('\n');
  assert.equal(lines[0], 'wrote 4096/4096 bytes at offset 0');
  assert.match(lines[1]!, STATS_RE);
  assert.ok(lines[1]!.startsWith('4 KiB, 1 ops; '));
  assert.equal(lines[2], 'read 65536/65536 bytes at offset 0');
  assert.ok(lines[3]!.startsWith('64 KiB, 1 ops; '));
  assert.match(lines[4]!, /^512,1,0:00:00\.\d\d,\d+\.\d{3},\d+\.\d{3}$/);
  assert.equal(lines.length, 6);
  assert.equal(lines[5], '');
});

test('json: filenames and --image-opts in keyval and JSON spelling', (t) => {
  const dir = tempDir(t);
  const img = rawImage(dir, 'a.img', 8192, 0x77);
  const viaJson = lockstepIo(['-c', 'read -P 0x77 0 8k', '-c', 'length', `json:{"driver":"raw","file":{"driver":"file","filename":${JSON.stringify(img)}}}`]);
  assert.equal(viaJson.status, 0, viaJson.stderr);
  assert.match(viaJson.stdout, /^8 KiB$/m);
  const viaKeyval = lockstepIo(['--image-opts', '-c', 'read -P 0x77 1k 1k', '-c', 'length', `driver=raw,file.driver=file,file.filename=${img},offset=1k`]);
  assert.equal(viaKeyval.status, 0, viaKeyval.stderr);
  assert.match(viaKeyval.stdout, /^7 KiB$/m);
  const viaJsonOpts = lockstepIo(['--image-opts', '-c', 'length', `{"driver":"raw","size":4096,"file":{"driver":"file","filename":${JSON.stringify(img)}}}`]);
  assert.equal(viaJsonOpts.status, 0, viaJsonOpts.stderr);
  assert.equal(viaJsonOpts.stdout, '4 KiB\n');
  // a comma in a filename is doubled in keyval
  const comma = rawImage(dir, 'a,b.img', 512, 1);
  const escaped = lockstepIo(['--image-opts', '-c', 'read -P 1 0 512', `driver=raw,file.filename=${comma.replace(/,/g, ',,')}`]);
  assert.equal(escaped.status, 0, escaped.stderr);
});

test('a probed raw image warns; a qcow2 magic is probed as qcow2', (t) => {
  const dir = tempDir(t);
  const img = rawImage(dir, 'a.img', 4096);
  const r = lockstepIo(['-c', 'length', img]);
  assert.equal(r.status, 0);
  assert.equal(r.stdout, '4 KiB\n');
  assert.match(r.stderr, /^WARNING: Image format was not specified for '.*a\.img' and probing guessed raw\.$/m);
  const q = join(dir, 'q.img');
  writeFileSync(q, Buffer.concat([Buffer.from('QFI\xfb', 'latin1'), Buffer.alloc(4092)]));
  const rq = lockstepIo(['-c', 'length', q]);
  // the probe names qcow2; opening it needs the qcow2 driver
  assert.doesNotMatch(rq.stderr, /probing guessed raw/);
  if (rq.status !== 0) assert.match(rq.stderr, /qcow2/);
});

test('error cases: one clear line, non-zero exit, no stack trace', (t) => {
  const dir = tempDir(t);
  const img = rawImage(dir, 'a.img', 1 << 20);
  const missing = join(dir, 'missing.img');
  const cases: Array<{ args: string[]; stderr: RegExp; stdout?: RegExp }> = [
    { args: ['-f', 'raw', '-c', 'length', missing], stderr: new RegExp(`^lockstep io: can't open device ${missing}: Could not open '${missing}': No such file or directory\n$`) },
    { args: ['-c', 'length', missing], stderr: new RegExp(`^lockstep io: can't open device ${missing}: Could not open '${missing}': No such file or directory\n$`) },
    { args: ['-f', 'nosuchfmt', '-c', 'length', img], stderr: /^lockstep io: can't open device .*: Unknown driver 'nosuchfmt'\n$/ },
    { args: ['-Z', img], stderr: /^lockstep io: invalid option -- 'Z'\n$/, stdout: /^Usage: lockstep io/ },
    { args: ['--bogus', img], stderr: /^lockstep io: unrecognized option '--bogus'\n$/, stdout: /^Usage: lockstep io/ },
    { args: ['-c'], stderr: /^lockstep io: option requires an argument -- 'c'\n$/ },
    { args: ['-f', 'raw', '--image-opts', img], stderr: /^lockstep io: --image-opts and -f are mutually exclusive\n$/ },
    { args: ['-c', 'length', img, img], stderr: /^lockstep io: too many arguments/ },
    { args: ['-c', 'length'], stderr: /^no file open, try 'help open'\n$/ },
    { args: ['-r', '-f', 'raw', '-c', 'write 0 1', img], stderr: /^lockstep io: Block node is read-only\n$/ },
    { args: ['--image-opts', '-c', 'length', 'driver=raw,a=1,a.b=2'], stderr: /^lockstep io: can't open: Parameters 'a\.\*' used inconsistently\n$/ },
    { args: ['--image-opts', '-c', 'length', `driver=raw,file.filename=${img},foo=bar`], stderr: /^lockstep io: can't open: Parameter 'foo' is unexpected\n$/ },
    { args: ['--image-opts', '-c', 'length', 'driver=raw'], stderr: /^lockstep io: can't open: Parameter 'file' is missing\n$/ },
    { args: ['-c', 'length', 'json:{"driver":'], stderr: /^lockstep io: can't open device json:\{"driver":: Could not parse the JSON options: / },
    { args: ['-c', 'length', 'json:[1]'], stderr: /^lockstep io: can't open device json:\[1\]: Invalid JSON object given\n$/ },
    { args: ['-f', 'raw', '-c', 'read 2M 1', img], stderr: /^$/, stdout: /^read failed: Input\/output error\n$/ },
  ];
  for (const c of cases) {
    const r = lockstepIo(c.args);
    const what = JSON.stringify(c.args);
    assert.equal(r.status, 1, `exit status of ${what}`);
    assert.match(r.stderr, c.stderr, `stderr of ${what}`);
    if (c.stdout) assert.match(r.stdout, c.stdout, `stdout of ${what}`);
    assert.doesNotMatch(r.stderr + r.stdout, /\n\s+at /, `no stack trace for ${what}`);
  }
});

test('without -c, commands are read from stdin until quit', (t) => {
  const dir = tempDir(t);
  const img = rawImage(dir, 'a.img', 65536);
  const r = lockstepIo(['-f', 'raw', img], 'write -P 0x33 0 512 -q\nread -P 0x33 0 512 -q\nlength\nquit\nwrite 0 512\n');
  assert.equal(r.status, 0, r.stderr);
  assert.equal(r.stdout, 'qemu-io> qemu-io> qemu-io> 64 KiB\nqemu-io> ');
  const data = readFileSync(img);
  assert.ok(data.subarray(0, 512).equals(Buffer.alloc(512, 0x33)));
  assert.ok(data.subarray(512).equals(Buffer.alloc(65536 - 512)));
});

test('qcow2 overlay: map, alloc and info match qemu-io (the image layer only, as qemu-io reports)', (t) => {
  const haveQcow2 = createRegistry().has('qcow2');
  if (!haveQemuIo && !process.env.CI) return t.skip('qemu-io is not installed');
  if (!haveQcow2) return t.skip('the qcow2 driver is not in this build yet');
  const dir = tempDir(t);
  const run = (cmd: string, args: string[]): void => {
    const r = spawnSync(cmd, args, { cwd: dir, encoding: 'utf8' });
    assert.equal(r.status, 0, r.stderr);
  };
  run('qemu-img', ['create', '-f', 'qcow2', 'b.qcow2', '1M']);
  run('qemu-img', ['create', '-f', 'qcow2', '-b', 'b.qcow2', '-F', 'qcow2', 't.qcow2']);
  run('qemu-io', ['-c', 'write -P 3 512k 64k', 'b.qcow2']);
  const w = lockstepIo(['-c', 'write -P 5 0 100k', join(dir, 't.qcow2')]);
  assert.equal(w.status, 0, w.stderr);
  const cmds = ['map', 'alloc 0 1M', 'alloc 512k 64k', 'info', 'length', 'read -P 5 0 100k', 'read -P 0 100k 412k', 'read -P 3 512k 64k'];
  const args = cmds.flatMap((c) => ['-c', c]);
  const q = qemuIo([...args, join(dir, 't.qcow2')])!;
  const l = lockstepIo([...args, join(dir, 't.qcow2')]);
  assert.equal(normalise(l.stdout), normalise(q.stdout));
  assert.equal(l.status, 0, l.stderr);
  assert.equal(q.status, 0, q.stderr);
});

test('a locked image: the second writer gets one clear error line', async (t) => {
  if (!loadNative() && !process.env.CI) return t.skip('cross-process image locks need the native helper (src/util/native.ts)');
  const dir = tempDir(t);
  // a qcow2 image: its format keeps a second writer off the file (two writers of a raw image
  // are let in, as QEMU lets them in)
  const img = join(dir, 'a.qcow2');
  await createQcow2(img, { size: 65536 });
  // the first lockstep io holds the image open for writing, waiting for commands on stdin
  const holder = spawn(process.execPath, [LOCKSTEP, 'io', '-f', 'qcow2', img], { stdio: ['pipe', 'pipe', 'pipe'] });
  t.after(() => {
    if (holder.exitCode === null) holder.kill();
  });
  await new Promise<void>((resolve, reject) => {
    let seen = '';
    holder.stdout.on('data', (b: Buffer) => {
      seen += b.toString();
      if (seen.includes('qemu-io> ')) resolve();
    });
    holder.on('exit', (code) => reject(new Error(`holder exited early (${code})`)));
  });
  const r = lockstepIo(['-f', 'qcow2', '-c', 'write 0 1', img]);
  assert.equal(r.status, 1);
  assert.equal(r.stderr, `lockstep io: can't open device ${img}: Failed to get "write" lock\nIs another process using the image [${img}]?\n`);
  const exited = new Promise((resolve) => holder.on('exit', resolve));
  holder.stdin.end('quit\n');
  assert.equal(await exited, 0);
});

test('an NBD URI: lockstep io reads and writes an export served by qemu-nbd', async (t) => {
  if (!createRegistry().has('nbd')) return t.skip('the nbd driver is not in this build yet');
  const haveQemuNbd = spawnSync('qemu-nbd', ['--version']).error === undefined;
  if (!haveQemuNbd && !process.env.CI) return t.skip('qemu-nbd is not installed');
  const dir = tempDir(t);
  const img = rawImage(dir, 'a.img', 1 << 20, 0x21);
  const sock = join(dir, 'nbd.sock');
  const server = spawn('qemu-nbd', ['-f', 'raw', '-t', '-x', 'disk', '-k', sock, img], { stdio: 'ignore' });
  t.after(() => {
    if (server.exitCode === null) server.kill();
  });
  for (let i = 0; i < 100 && !existsSync(sock); i++) await new Promise((r) => setTimeout(r, 50));
  assert.ok(existsSync(sock), 'qemu-nbd did not create its socket');
  const uri = `nbd+unix:///disk?socket=${sock}`;
  const r = lockstepIo(['-f', 'raw', '-c', 'read -P 0x21 0 64k', '-c', 'write -P 0x42 4k 4k', '-c', 'length', uri]);
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /^1 MiB$/m);
  const check = qemuIo(['-f', 'raw', '-c', 'read -P 0x42 4k 4k', '-c', 'read -P 0x21 8k 4k', uri])!;
  assert.equal(check.status, 0, check.stdout + check.stderr);
});
