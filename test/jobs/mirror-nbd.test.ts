// Mirror into an NBD export served by qemu-nbd, through lockstep's nbd client node. Needs
// the nbd driver in the registry (until branch nbd is merged this skips, saying so) and
// qemu-nbd (required under CI).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, openSync, closeSync, ftruncateSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { JobManager } from '../../src/jobs/job.js';
import { startMirror } from '../../src/jobs/mirror.js';
import { newGraph, tempDir } from '../helpers/graph.js';
import { addNode, fill, haveTool, nextEvent, until } from '../helpers/jobs.js';

const MiB = 1024 * 1024;

test('mirror sync=full into a qemu-nbd export, then cancel after READY leaves it equal', async (t) => {
  const g = newGraph();
  if (!g.drivers.has('nbd')) {
    t.skip('the nbd driver is not in the registry yet (branch nbd not merged)');
    return;
  }
  if (!haveTool(t, 'qemu-nbd')) return;
  const dir = tempDir(t);
  const size = 8 * MiB;
  const img = join(dir, 'target.raw');
  const fd = openSync(img, 'w');
  ftruncateSync(fd, size);
  closeSync(fd);
  const sock = join(dir, 'nbd.sock');
  const server = spawn('qemu-nbd', ['-f', 'raw', '-t', '-k', sock, '-x', 'parent0', img], { stdio: 'ignore' });
  t.after(() => server.kill('SIGTERM'));
  await until(() => existsSync(sock), 'qemu-nbd socket');
  const mgr = new JobManager(g);
  const src = await addNode(g, { driver: 'memory', size, 'node-name': 'src' });
  const model = Buffer.alloc(size);
  for (let i = 0; i < 8; i += 2) fill(i + 1, MiB).copy(model, i * MiB);
  await src.write(0, model);
  const nbd = await addNode(g, { driver: 'nbd', 'node-name': 'target', server: { type: 'unix', path: sock }, export: 'parent0', 'open-timeout': 5 });
  const be = g.createBackend(src, { name: 'colo-disk0' });
  const job = await startMirror(mgr, { jobId: 'resync', source: src, target: nbd, sync: 'full', mode: 'existing' });
  await nextEvent(mgr, 'BLOCK_JOB_READY');
  await be.write(MiB + 5, fill(99, 1000));
  fill(99, 1000).copy(model, MiB + 5);
  const r = await job.cancel(false);
  assert.equal(r.ret, 0);
  assert.equal(be.node, src);
  assert.ok((await nbd.read(0, size)).equals(model));
  await g.closeAll();
  assert.ok(readFileSync(img).equals(model), 'the exported file holds the source');
});
