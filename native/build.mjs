// Builds the optional native helper with node-gyp. Run by `npm install`/`npm ci` (this
// package's install script) and by `npm run build:native`. It never fails: lockstep works
// without the helper, so a missing compiler, python or Node headers only prints a notice
// and exits 0. It never downloads anything: node-gyp is pointed at headers on this machine
// (npm's `nodedir` setting, else the include/node folder installed beside the node binary).
import { existsSync, rmSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const addon = join(here, 'build', 'Release', 'lockstep_native.node');

function skip(reason) {
  console.warn(`lockstep-native: not built (${reason}); lockstep runs without it`);
  process.exit(0);
}

function findNodeDir() {
  const candidates = [process.env.npm_config_nodedir, resolve(dirname(process.execPath), '..')];
  for (const dir of candidates) {
    if (dir && existsSync(join(dir, 'include', 'node', 'node_api.h')) && existsSync(join(dir, 'include', 'node', 'common.gypi'))) {
      return dir;
    }
  }
  return null;
}

function findNodeGyp() {
  const candidates = [
    process.env.npm_config_node_gyp,
    process.env.npm_execpath && join(dirname(process.env.npm_execpath), '..', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'),
    join(dirname(process.execPath), '..', 'lib', 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'),
  ];
  return candidates.find((p) => p && existsSync(p)) ?? null;
}

if (process.platform !== 'linux') skip(`${process.platform} is not Linux`);
if (process.env.LOCKSTEP_SKIP_NATIVE_BUILD) skip('LOCKSTEP_SKIP_NATIVE_BUILD is set');
const nodeDir = findNodeDir();
if (!nodeDir) skip('no Node.js headers found (set npm config nodedir)');
const nodeGyp = findNodeGyp();
if (!nodeGyp) skip('node-gyp not found');

const r = spawnSync(process.execPath, [nodeGyp, 'rebuild', `--nodedir=${nodeDir}`], {
  cwd: here,
  stdio: ['ignore', 'inherit', 'inherit'],
  timeout: 300_000,
  env: { ...process.env, npm_config_nodedir: nodeDir },
});
if (r.status !== 0) {
  rmSync(join(here, 'build'), { recursive: true, force: true });
  skip(r.error ? `node-gyp: ${r.error.message}` : `node-gyp exited with ${r.status ?? r.signal}`);
}
// A module that builds but does not load is no better than none.
const check = spawnSync(process.execPath, ['-e', `require(${JSON.stringify(addon)})`], { stdio: 'inherit', timeout: 30_000 });
if (check.status !== 0) {
  rmSync(join(here, 'build'), { recursive: true, force: true });
  skip('the built module does not load');
}
console.log(`lockstep-native: built ${addon}`);
