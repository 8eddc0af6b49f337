// QMP integer, size and id arguments (issue 15, item 6): each command goes to
// qemu-storage-daemon and to a lockstep daemon; the replies must be the same.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { connect } from 'node:net';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { setTimeout as sleep } from 'node:timers/promises';
import { tempDir } from '../helpers/graph.js';
import { startDaemon } from '../helpers/daemon.js';
import { requireTool } from '../helpers/tls.js';

const nullCo = (name: string, size: string): string => `{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"${name}","size":${size}}}`;
const exportId = (id: string): string => `{"execute":"block-export-add","arguments":{"type":"nbd","id":${JSON.stringify(id)},"node-name":"ok"}}`;
const speed = (v: string): string => `{"execute":"block-job-set-speed","arguments":{"device":"nojob","speed":${v}}}`;

// raw text: the literals must reach the parser as written
const COMMANDS = [
  nullCo('n1', '18446744073709551616'), // 2^64: a double for QEMU
  nullCo('n2', '1e20'),
  nullCo('n3', '9223372036854775807'), // INT64_MAX: past the largest disk
  nullCo('n4', '1.5'),
  nullCo('n5', '9223372036854775808'), // 2^63: a uint64, no int
  nullCo('n6', '9223372036854775296'),
  nullCo('n7', '4611686018427387904'), // 2^62: accepted
  nullCo('ok', '1048576'),
  exportId(''),
  exportId('#x'),
  exportId('a b'),
  exportId('1abc'),
  '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"","size":1}}',
  '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"#a","size":1}}',
  '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"a234567890123456789012345678901234","size":1}}',
  speed('9223372036854775808'),
  speed('1e3'),
  speed('-9223372036854775809'),
  speed('2.5'),
];

async function replies(path: string): Promise<unknown[]> {
  const sock = connect(path);
  const lines = createInterface({ input: sock })[Symbol.asyncIterator]();
  await lines.next(); // greeting
  const out: unknown[] = [];
  for (const c of ['{"execute":"qmp_capabilities"}', ...COMMANDS]) {
    sock.write(c + '\n');
    out.push(JSON.parse((await lines.next()).value as string));
  }
  sock.destroy();
  return out;
}

test('integer, size and id arguments are refused as QEMU refuses them, with its messages', async (t) => {
  if (!requireTool(t, 'qemu-storage-daemon', ['--version'])) return;
  const dir = tempDir(t);
  const qsdPath = join(dir, 'qsd.sock');
  const qsd = spawn('qemu-storage-daemon', ['--chardev', `socket,id=m,path=${qsdPath},server=on,wait=off`, '--monitor', 'chardev=m'], { stdio: 'ignore' });
  t.after(() => qsd.kill());
  for (let i = 0; i < 100 && !existsSync(qsdPath); i++) await sleep(50);
  const d = await startDaemon(t, dir, []);
  t.after(() => d.stop());
  const q = await replies(qsdPath);
  const l = await replies(d.qmpPath);
  for (let i = 0; i < q.length; i++) assert.deepEqual(l[i], q[i], i === 0 ? 'qmp_capabilities' : COMMANDS[i - 1]);
  // and the values that pass are the ones QEMU takes
  assert.deepEqual(l[7], { return: {} });
  assert.deepEqual(l[8], { return: {} });
});
