// The folders of src/ show who uses whom: every import runs one way, downwards through the
// layers below (docs/architecture.md, "Layers"). A module may import its own folder and any
// folder of a lower layer; an import sideways (two folders of one layer) or upwards fails here,
// type-only imports included (they tie the modules together just the same).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve, sep } from 'node:path';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../../..');
const SRC = join(ROOT, 'src');

/** Folder (a path under src/, longest match wins) -> layer; higher layers use lower ones. */
const LAYERS: ReadonlyArray<readonly [string, number]> = [
  ['errors.ts', 0], // the error types every layer throws
  ['util', 1],
  ['nbd', 2], // the NBD protocol: constants, codec, streams, TLS, the client
  ['block', 3], // the graph, nodes, drivers, filters and the copy engine
  ['nbd/server', 4], // a user of block backends, as the exports are
  ['jobs', 4],
  ['replication', 5],
  ['qmp', 6], // the monitor, its commands and the tables they drive (exports, objects)
  ['daemon', 7],
  ['pair', 7],
  ['cli', 8],
];

/**
 * Imports this session could not turn round, each with the reason. Keep it short: an entry
 * leaves when its cause does.
 */
const ALLOWED: ReadonlyMap<string, string> = new Map<string, string>([]);

/** The folder key of a file under src/ and its layer. */
function layerOf(file: string): { key: string; layer: number } {
  let best: readonly [string, number] | undefined;
  for (const entry of LAYERS) {
    const [prefix] = entry;
    if (file === prefix || file.startsWith(prefix + '/')) {
      if (!best || prefix.length > best[0].length) best = entry;
    }
  }
  assert.ok(best, `src/${file} is in no layer: add its folder to LAYERS`);
  return { key: best[0], layer: best[1] };
}

/** Why an import from `from` to `to` (both relative to src/) runs the wrong way, or null. */
function wrongWay(from: string, to: string): string | null {
  const a = layerOf(from);
  const b = layerOf(to);
  if (a.key === b.key) return null;
  if (a.layer > b.layer) return null;
  return a.layer === b.layer ? `sideways (${a.key} and ${b.key} are both layer ${a.layer})` : `upwards (${a.key} is layer ${a.layer}, ${b.key} layer ${b.layer})`;
}

function sourceFiles(dir: string): string[] {
  const out: string[] = [];
  for (const name of readdirSync(dir).sort()) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) out.push(...sourceFiles(p));
    else if (name.endsWith('.ts')) out.push(p);
  }
  return out;
}

/** Every module specifier of a file: imports, re-exports, dynamic imports, `declare module`. */
function specifiers(path: string): string[] {
  const info = ts.preProcessFile(readFileSync(path, 'utf8'), true, true);
  return [...info.importedFiles.map((f) => f.fileName), ...(info.ambientExternalModules ?? [])];
}

function posix(p: string): string {
  return p.split(sep).join('/');
}

test('the layer rule flags an import running upwards or sideways, and passes one running down', () => {
  assert.match(wrongWay('util/keyval.ts', 'block/options.ts') ?? '', /^upwards/);
  assert.match(wrongWay('qmp/dispatch.ts', 'daemon/log.ts') ?? '', /^upwards/);
  assert.match(wrongWay('block/drivers/nbd.ts', 'nbd/server/server.ts') ?? '', /^upwards/);
  assert.match(wrongWay('daemon/daemon.ts', 'pair/sides.ts') ?? '', /^sideways/);
  assert.equal(wrongWay('nbd/server/server.ts', 'block/node.ts'), null);
  assert.equal(wrongWay('block/drivers/nbd.ts', 'nbd/client/client.ts'), null);
  assert.equal(wrongWay('cli/pair.ts', 'pair/supervisor.ts'), null);
  assert.equal(wrongWay('nbd/server/server.ts', 'nbd/codec.ts'), null);
});

test('every import under src/ runs downwards (or is on the reasoned allow-list)', () => {
  const files = sourceFiles(SRC);
  assert.ok(files.length > 100, `found only ${files.length} files under ${SRC}`);
  const wrong: string[] = [];
  const used = new Set<string>();
  let relativeImports = 0;
  for (const path of files) {
    const from = posix(relative(SRC, path));
    for (const spec of specifiers(path)) {
      if (!spec.startsWith('.')) continue; // node: builtins and packages
      relativeImports++;
      const to = posix(relative(SRC, resolve(dirname(path), spec))).replace(/\.js$/, '.ts');
      assert.ok(!to.startsWith('..'), `src/${from} imports ${spec}, outside src/`);
      const why = wrongWay(from, to);
      if (why === null) continue;
      const edge = `${from} -> ${to}`;
      if (ALLOWED.has(edge)) used.add(edge);
      else wrong.push(`src/${edge}: ${why}`);
    }
  }
  assert.ok(relativeImports > 300, `parsed only ${relativeImports} relative imports`);
  assert.deepEqual(wrong, [], 'imports running the wrong way');
  // an allow-list entry whose import has gone must go too
  assert.deepEqual([...ALLOWED.keys()].filter((e) => !used.has(e)), [], 'stale allow-list entries');
});
