// `lockstep pair status` for people and scripts: the view of each stage, fields a supervisor
// may add later (generation, consistency, resync, late heartbeats), and --check's exit codes.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { CHECK_EXIT, checkCode, checkLine, renderStatus } from '../../src/cli/pair-status.js';

const base = {
  stage: 'protected',
  role: 'primary serving',
  checkpoints: 25,
  'checkpoint-failures': 0,
  'last-pause-ms': 1.234,
  'pause-median-ms': 1.1,
  'pause-p99-ms': 12.5,
  'hidden-copied-bytes': 65536,
  'dirty-clusters': 1,
  'heartbeat-age-ms': 24,
  serving: ['nbd+unix:///disk?socket=/d/disk.sock', 'nbd://127.0.0.1:10809/disk'],
};

test('a protected pair: both sides, checkpoints and pause percentiles, data, addresses', () => {
  assert.equal(
    renderStatus(base),
    [
      'pair  stage protected  role primary serving',
      '  primary     up, serving  heartbeat 24 ms ago',
      '  secondary   up, replica',
      '  checkpoints 25  pause last 1.23 ms, median 1.10 ms, p99 13 ms',
      '  copied into the hidden disk 64.0 KiB in all, 1 clusters since the last checkpoint',
      '  serving nbd+unix:///disk?socket=/d/disk.sock',
      '          nbd://127.0.0.1:10809/disk',
      '',
    ].join('\n'),
  );
});

test('degraded: the secondary down, the out-of-sync bytes and where they are listed, the error', () => {
  const v = renderStatus({
    ...base,
    stage: 'degraded',
    'checkpoint-failures': 2,
    'changed-bytes': 3 * 2 ** 20,
    'changed-regions-file': '/d/changed-regions.json',
    'last-error': 'the secondary died: the primary keeps serving without protection',
  });
  assert.match(v, /^ {2}secondary {3}down$/m);
  assert.match(v, /^ {2}checkpoints 25 \(2 failed\)/m);
  assert.match(v, /^ {2}out of sync 3\.0 MiB \(changed since the last confirmed checkpoint, listed in \/d\/changed-regions\.json\)$/m);
  assert.match(v, /^ {2}last error: the secondary died/m);
});

test('fields a supervisor adds later are shown as soon as they are present', () => {
  const now = Date.parse('2026-01-01T12:00:10Z');
  const v = renderStatus(
    {
      ...base,
      stage: 'resyncing',
      generation: { primary: 7, secondary: 6 },
      consistent: { primary: true, secondary: false },
      'late-heartbeats': { primary: 3, secondary: 0 },
      'side-state': { secondary: 'up, resync target' },
      resync: { done: 2 ** 30, total: 4 * 2 ** 30, 'eta-seconds': 95 },
      'last-checkpoint': '2026-01-01T12:00:08Z',
    },
    now,
  );
  assert.match(v, /^ {2}primary {5}up, serving {2}generation 7 {2}consistent {2}heartbeat 24 ms ago {2}late heartbeats 3$/m);
  assert.match(v, /^ {2}secondary {3}up, resync target {2}generation 6 {2}INCONSISTENT {2}late heartbeats 0$/m);
  assert.match(v, /^ {2}resync: 25\.0% \(1\.0 GiB of 4\.0 GiB\), ETA 1 min 35 s$/m);
  assert.match(v, /^ {2}checkpoints 25, last 2 s ago {2}pause/m);
});

test('--check: one line, and a distinct exit code per situation', () => {
  const cases: Array<[string, number]> = [
    ['protected', 0],
    ['starting', 2],
    ['syncing', 2],
    ['resyncing', 2],
    ['degraded', 3],
    ['failed-over', 4],
    ['primary-lost', 5],
    ['something-new', 6],
    ['stopped', 7],
  ];
  for (const [stage, code] of cases) assert.equal(checkCode({ stage }), code, stage);
  assert.equal(new Set(Object.values(CHECK_EXIT)).size, Object.keys(CHECK_EXIT).length);
  assert.equal(checkLine(base), 'protected: primary serving, last pause 1.23 ms\n');
  assert.equal(
    checkLine({ ...base, stage: 'degraded', 'changed-bytes': 2 ** 20, 'last-error': 'the secondary died' }),
    'degraded: primary serving, last pause 1.23 ms, out of sync 1.0 MiB, the secondary died\n',
  );
});

test('split brain: each side\'s changes, the diverged regions and the commands that settle it; --check exits 8', () => {
  const st = {
    ...base,
    stage: 'split-brain',
    role: 'none serving',
    checkpoints: 0,
    'heartbeat-age-ms': null,
    'last-pause-ms': null,
    serving: [],
    'last-error': 'split brain: both disks changed since generation g0',
    sides: {
      primary: { generation: 'g1', consistent: true, role: 'Secondary', 'changed-bytes': 262144, resync: null },
      secondary: { generation: 'g2', consistent: true, role: 'Secondary', 'changed-bytes': 196608, resync: null },
    },
    'split-brain': {
      reason: 'both disks changed since generation g0',
      'changed-bytes': { primary: 262144, secondary: 196608 },
      'diverged-bytes': 393216,
      commands: ['lockstep pair resolve --keep primary --control /d/pair.sock', 'lockstep pair resolve --keep secondary --control /d/pair.sock'],
    },
  };
  const view = renderStatus(st).split('\n');
  assert.equal(view[1], '  primary     up, diverged  role Secondary  changed 256.0 KiB');
  assert.equal(view[2], '  secondary   up, diverged  role Secondary  changed 192.0 KiB');
  assert.ok(view.includes('  SPLIT BRAIN: both disks changed since generation g0'), view.join('\n'));
  assert.ok(view.includes('  diverged regions 384.0 KiB (the union of both change records); nothing is served or copied'), view.join('\n'));
  assert.ok(view.includes('    lockstep pair resolve --keep secondary --control /d/pair.sock'), view.join('\n'));
  assert.equal(checkCode(st), CHECK_EXIT['split-brain']);
  assert.equal(CHECK_EXIT['split-brain'], 8);
  assert.match(checkLine(st), /^split-brain: none serving, split brain: both disks changed since generation g0, changed: primary 256\.0 KiB, secondary 192\.0 KiB\n$/);
});

test('a resync target\'s line: progress, rate and ETA', () => {
  const st = {
    ...base,
    stage: 'resyncing',
    sides: {
      primary: { generation: 'g1', consistent: true, role: 'Primary', 'changed-bytes': 3145728, resync: null },
      secondary: { generation: 'g0', consistent: false, role: 'Secondary', 'changed-bytes': null, resync: { done: 1048576, total: 4194304, 'bytes-per-second': 2097152, 'eta-seconds': 1.5 } },
    },
  };
  const view = renderStatus(st).split('\n');
  assert.match(view[2]!, /^  secondary   up, resync target  role Secondary  resync target 1\.0 MiB of 4\.0 MiB at 2\.0 MiB\/s, ETA \S+/);
  assert.match(view[1]!, /role Primary  changed 3\.0 MiB/);
});

test('roles swapped after a failover\'s re-protection: the secondary daemon serves, the primary is its replica', () => {
  assert.deepEqual(renderStatus({ ...base, 'primary-side': 'secondary' }).split('\n').slice(0, 3), [
    'pair  stage protected  role primary serving  (roles swapped: the secondary daemon is the primary)',
    '  primary     up, replica',
    '  secondary   up, serving  heartbeat 24 ms ago',
  ]);
  // its failover goes back to the side started as primary
  const back = renderStatus({ ...base, stage: 'failed-over', role: 'secondary serving', 'primary-side': 'secondary' }).split('\n');
  assert.equal(back[1], '  primary     up, serving');
  assert.equal(back[2], '  secondary   down');
});
