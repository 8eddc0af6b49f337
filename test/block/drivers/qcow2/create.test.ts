// createQcow2 produces the same bytes as qemu-img create -f qcow2 (QEMU 7.2).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from '../../../helpers/graph.js';
import { createQcow2, type CreateQcow2Options } from '../../../../src/block/drivers/qcow2/create.js';
import { needTools, run } from './tools.js';

const GiB = 2 ** 30;
const CASES: Array<[CreateQcow2Options, string[]]> = [
  [{ size: GiB }, []],
  [{ size: GiB, clusterSize: 512 }, ['-o', 'cluster_size=512']],
  [{ size: GiB, clusterSize: 4096 }, ['-o', 'cluster_size=4096']],
  [{ size: GiB, clusterSize: 2 * 1024 * 1024 }, ['-o', 'cluster_size=2M']],
  [{ size: GiB, compat: '0.10' }, ['-o', 'compat=0.10']],
  [{ size: GiB, refcountBits: 1 }, ['-o', 'refcount_bits=1']],
  [{ size: GiB, refcountBits: 64 }, ['-o', 'refcount_bits=64']],
  [{ size: GiB, lazyRefcounts: true }, ['-o', 'lazy_refcounts=on']],
  [{ size: GiB, backingFile: 'base.qcow2', backingFormat: 'qcow2' }, ['-u', '-b', 'base.qcow2', '-F', 'qcow2']],
  [{ size: GiB, backingFile: 'base.raw', backingFormat: 'raw', compat: '0.10' }, ['-u', '-b', 'base.raw', '-F', 'raw', '-o', 'compat=0.10']],
  [{ size: 8 * GiB, clusterSize: 512 }, ['-o', 'cluster_size=512']],
  [{ size: 3 * GiB, clusterSize: 1024, refcountBits: 64 }, ['-o', 'cluster_size=1024,refcount_bits=64']],
  [{ size: 20 * 2 ** 20, preallocation: 'metadata' }, ['-o', 'preallocation=metadata']],
  [{ size: 50 * 2 ** 20 + 512, preallocation: 'metadata', clusterSize: 4096 }, ['-o', 'preallocation=metadata,cluster_size=4096']],
  [{ size: 0 }, []],
];

test('createQcow2 is byte-identical to qemu-img create', async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  const dir = tempDir(t);
  for (const [opts, args] of CASES) {
    const mine = join(dir, 'mine.qcow2');
    const theirs = join(dir, 'theirs.qcow2');
    await createQcow2(mine, opts);
    run('qemu-img', ['create', '-q', '-f', 'qcow2', ...args, theirs, String(opts.size)], { cwd: dir });
    const a = readFileSync(mine);
    const b = readFileSync(theirs);
    let first = -1;
    for (let i = 0; i < Math.max(a.length, b.length) && first < 0; i++) if (a[i] !== b[i]) first = i;
    assert.equal(first, -1, `${JSON.stringify(opts)}: first difference at byte 0x${first.toString(16)} (lengths ${a.length}, ${b.length})`);
  }
});

test('createQcow2 rejects invalid options with clear messages', async (t) => {
  const dir = tempDir(t);
  const p = join(dir, 'x.qcow2');
  await assert.rejects(createQcow2(p, { size: 1000 }), /multiple of 512/);
  await assert.rejects(createQcow2(p, { size: GiB, clusterSize: 3000 }), /Cluster size must be a power of two between 512 and 2048k/);
  await assert.rejects(createQcow2(p, { size: GiB, clusterSize: 4 * 1024 * 1024 }), /Cluster size/);
  await assert.rejects(createQcow2(p, { size: GiB, refcountBits: 3 }), /Refcount width must be a power of two/);
  await assert.rejects(createQcow2(p, { size: GiB, compat: '0.10', refcountBits: 8 }), /compatibility level 1.1/);
  await assert.rejects(createQcow2(p, { size: GiB, compat: '0.10', lazyRefcounts: true }), /Lazy refcounts only supported with compatibility level 1.1/);
  await assert.rejects(createQcow2(p, { size: GiB, backingFormat: 'raw' }), /Backing format cannot be used without backing file/);
});
