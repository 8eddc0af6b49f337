// NBD server benchmark: lockstep's server, qemu-nbd and nbdkit's file plugin serving the same
// raw file on loopback, with the same client workloads, in one run:
//   nbdcopy of 512 MiB into the export and out of it, and fio's nbd engine with 4 KiB random
//   writes/reads at queue depth 32 and 1 MiB sequential writes/reads at depth 8.
// Prints MiB/s (nbdcopy) or IOPS (fio) per server and the ratios.
// lockstep's file I/O goes through the native helper's io_uring for requests up to 64 KiB and
// libuv's thread pool for larger ones (LOCKSTEP_IO_URING=auto, the default); --uring adds two
// last columns with every request through the thread pool (off) and through the ring (on).
// --baseline=<dir> adds lockstep built in <dir> (another checkout's nbd-serve.mjs and dist/,
// e.g. the commit before a change) as a column, for before/after ratios in the same run.
// --rows=<a,b> keeps the rows whose label contains one of the words (e.g. --rows=randwrite,in),
// --servers=<a,b> the servers named (the ratio columns need lockstep, multi-conn, qemu-nbd and
// nbdkit); --env=NAME=VALUE adds a column with lockstep run with that environment variable set.
// usage: npm run build && nice -n 10 node bench/nbd.mjs [--runtime=8] [--size-mib=512] [--rounds=3] [--uring] [--baseline=<dir>]
//   [--rows=...] [--servers=...] [--env=NAME=VALUE]
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync, openSync, closeSync, ftruncateSync } from 'node:fs';
import { connect } from 'node:net';
import { loadavg, tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { randomFillSync } from 'node:crypto';
import { fileURLToPath } from 'node:url';

const args = Object.fromEntries(process.argv.slice(2).map((a) => {
  const [k, ...v] = a.replace(/^--/, '').split('=');
  return [k, v.join('=')];
}));
const RUNTIME = Number(args.runtime ?? 8);
const SIZE_MIB = Number(args['size-mib'] ?? 512);
const PORT = 20800 + Math.floor(Math.random() * 100);
const here = dirname(fileURLToPath(import.meta.url));

for (const tool of ['qemu-nbd', 'nbdkit', 'nbdcopy', 'fio']) {
  if (spawnSync('which', [tool]).status !== 0) {
    console.error(`bench/nbd: ${tool} is not installed`);
    process.exit(1);
  }
}

const dir = mkdtempSync(join(tmpdir(), 'lockstep-bench-nbd-'));
const srcImg = join(dir, 'src.img');
const disk = join(dir, 'disk.img');
const outImg = join(dir, 'out.img');
{
  const chunk = Buffer.alloc(1 << 20);
  const fd = openSync(srcImg, 'w');
  for (let i = 0; i < SIZE_MIB; i++) {
    randomFillSync(chunk);
    writeFileSync(fd, chunk);
  }
  closeSync(fd);
  const d = openSync(disk, 'w');
  ftruncateSync(d, SIZE_MIB << 20);
  closeSync(d);
}

const SERVERS = {
  lockstep: ['node', [join(here, 'nbd-serve.mjs'), disk, String(PORT)]],
  'lockstep multi-conn': ['node', [join(here, 'nbd-serve.mjs'), disk, String(PORT), 'on']],
  'qemu-nbd': ['qemu-nbd', ['-f', 'raw', '-b', '127.0.0.1', '-p', String(PORT), '-t', '--cache=writeback', disk]],
  nbdkit: ['nbdkit', ['-f', '-i', '127.0.0.1', '-p', String(PORT), 'file', disk]],
};
if (args.baseline) SERVERS['lockstep baseline'] = ['node', [join(args.baseline, 'bench', 'nbd-serve.mjs'), disk, String(PORT)]];
if ('uring' in args) {
  SERVERS['lockstep uring off'] = ['node', [join(here, 'nbd-serve.mjs'), disk, String(PORT)], { LOCKSTEP_IO_URING: 'off' }];
  SERVERS['lockstep uring on'] = ['node', [join(here, 'nbd-serve.mjs'), disk, String(PORT)], { LOCKSTEP_IO_URING: 'on' }];
}
if (args.env) {
  const [k, ...v] = args.env.split('=');
  SERVERS[`lockstep ${args.env}`] = ['node', [join(here, 'nbd-serve.mjs'), disk, String(PORT)], { [k]: v.join('=') }];
}
if (args.servers) {
  const keep = args.servers.split(',');
  for (const name of Object.keys(SERVERS)) if (!keep.includes(name)) delete SERVERS[name];
}

function waitPort() {
  return new Promise((resolve, reject) => {
    let tries = 0;
    const attempt = () => {
      const s = connect({ host: '127.0.0.1', port: PORT });
      s.once('connect', () => {
        s.destroy();
        resolve();
      });
      s.once('error', () => {
        s.destroy();
        if (++tries > 100) reject(new Error('server did not start'));
        else setTimeout(attempt, 100);
      });
    };
    attempt();
  });
}

const uri = `nbd://127.0.0.1:${PORT}`;
function nbdcopy(from, to) {
  const t0 = process.hrtime.bigint();
  const r = spawnSync('nbdcopy', [from, to], { stdio: ['ignore', 'ignore', 'pipe'] });
  if (r.status !== 0) throw new Error(`nbdcopy ${from} ${to}: ${r.stderr}`);
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  return SIZE_MIB / s;
}
function fio(rw, bs, depth) {
  const r = spawnSync(
    'fio',
    ['--name=bench', '--ioengine=nbd', `--uri=${uri}`, `--rw=${rw}`, `--bs=${bs}`, `--iodepth=${depth}`, `--size=${SIZE_MIB}M`,
      `--runtime=${RUNTIME}`, '--time_based', '--output-format=json'],
    { encoding: 'utf8' },
  );
  if (r.status !== 0) throw new Error(`fio ${rw}: ${r.stderr}`);
  const j = JSON.parse(r.stdout.slice(r.stdout.indexOf('{')));
  const job = j.jobs[0];
  return job.read.iops + job.write.iops;
}

const ALL_ROWS = [
  ['nbdcopy 512 MiB in (MiB/s)', () => nbdcopy(srcImg, uri)],
  ['nbdcopy 512 MiB out (MiB/s)', () => nbdcopy(uri, outImg)],
  ['fio 4k randwrite qd32 (IOPS)', () => fio('randwrite', '4k', 32)],
  ['fio 4k randread qd32 (IOPS)', () => fio('randread', '4k', 32)],
  ['fio 1M write qd8 (IOPS)', () => fio('write', '1M', 8)],
  ['fio 1M read qd8 (IOPS)', () => fio('read', '1M', 8)],
];
// the copy out reads back what the copy in wrote: choosing it keeps the copy in
const ROWS = args.rows
  ? ALL_ROWS.filter(([label], i) => args.rows.split(',').some((w) => label.includes(w) || (i === 0 && ALL_ROWS[1][0].includes(w))))
  : ALL_ROWS;

// The machine may be shared: servers take turns over ROUNDS rounds and each cell keeps its
// best result, so that a burst of outside load does not land on one server only.
const ROUNDS = Number(args.rounds ?? 3);
const results = {};
try {
  for (let round = 0; round < ROUNDS; round++) {
    for (const [name, [cmd, argv, env]] of Object.entries(SERVERS)) {
      const child = spawn(cmd, argv, { stdio: 'ignore', env: { ...process.env, ...env } });
      try {
        await waitPort();
        const r = ROWS.map(([, run]) => run());
        results[name] = results[name] ? results[name].map((v, i) => Math.max(v, r[i])) : r;
        if (ROWS.some(([label]) => label.includes('out'))) {
          const cmp = spawnSync('cmp', [srcImg, outImg]);
          if (cmp.status !== 0) throw new Error(`${name}: data read back differs from data written`);
        }
      } finally {
        child.kill('SIGTERM');
        await new Promise((r) => child.once('exit', r));
      }
      process.stderr.write(`round ${round + 1}: ${name} done\n`);
    }
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}

console.log(`load average at the end: ${loadavg().map((x) => x.toFixed(1)).join(' ')}`);
const f = (x) => (x >= 100 ? Math.round(x).toString() : x.toFixed(1));
const cols = Object.keys(SERVERS);
// ratio columns for the servers present: [label, numerator, denominator]
const RATIOS = [
  ['lockstep/qemu-nbd', 'lockstep', 'qemu-nbd'],
  ['lockstep/nbdkit', 'lockstep', 'nbdkit'],
  ['multi-conn/nbdkit', 'lockstep multi-conn', 'nbdkit'],
  ['baseline/qemu-nbd', 'lockstep baseline', 'qemu-nbd'],
  ['baseline/nbdkit', 'lockstep baseline', 'nbdkit'],
  ['lockstep/baseline', 'lockstep', 'lockstep baseline'],
].filter(([, a, b]) => a in SERVERS && b in SERVERS);
if (args.env) RATIOS.push([`env/lockstep`, `lockstep ${args.env}`, 'lockstep']);
const ratios = RATIOS.filter(([, a, b]) => a in SERVERS && b in SERVERS);
console.log(`| workload | ${[...cols, ...ratios.map(([l]) => l)].join(' | ')} |`);
console.log(`|---|${[...cols, ...ratios].map(() => '---:').join('|')}|`);
ROWS.forEach(([label], i) => {
  const v = cols.map((c) => f(results[c][i]));
  const r = ratios.map(([, a, b]) => (results[a][i] / results[b][i]).toFixed(2));
  console.log(`| ${label} | ${[...v, ...r].join(' | ')} |`);
});
