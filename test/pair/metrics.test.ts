// The scrape in every stage, read with a Prometheus text parser: exactly one stage, each side's
// role and the link's state set to 1, and the out-of-sync gauge only where it is known.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import parsePrometheusTextFormat from 'parse-prometheus-text-format';
import { PAIR_STAGES, PairMetrics } from '../../src/pair/metrics.js';

test("a split brain found while the survivor serves: the status's own roles (the survivor Primary), not the stage's", () => {
  const m = new PairMetrics();
  const sides = { primary: { 'changed-bytes': 131072, role: 'Secondary' as const }, secondary: { 'changed-bytes': 1048576, role: 'Primary' as const } };
  const r = read(m.render({ stage: 'split-brain', 'primary-side': 'secondary', sides }));
  assert.deepEqual(r.ones('lockstep_pair_role'), [
    { side: 'primary', role: 'Secondary' },
    { side: 'secondary', role: 'Primary' },
  ]);
});

function read(text: string) {
  const families = parsePrometheusTextFormat(text);
  const ones = (name: string) =>
    families
      .find((f) => f.name === name)!
      .metrics.filter((m) => m.value === '1')
      .map((m) => m.labels);
  const oos = families.find((f) => f.name === 'lockstep_pair_peerdevice_outofsync_bytes')!.metrics;
  return { ones, oos };
}

test('each stage sets one stage, the roles and the link state as drbd-reactor would', () => {
  const m = new PairMetrics();
  const expect: Record<string, { roles: [string, string]; conn: string }> = {
    starting: { roles: ['Primary', 'Secondary'], conn: 'Connecting' },
    syncing: { roles: ['Primary', 'Secondary'], conn: 'Connected' },
    protected: { roles: ['Primary', 'Secondary'], conn: 'Connected' },
    'primary-lost': { roles: ['Unknown', 'Secondary'], conn: 'Unconnected' },
    'failed-over': { roles: ['Unknown', 'Primary'], conn: 'StandAlone' },
    degraded: { roles: ['Primary', 'Unknown'], conn: 'Unconnected' },
    resyncing: { roles: ['Primary', 'Secondary'], conn: 'Connected' },
    // neither side serves until the operator keeps one
    'split-brain': { roles: ['Secondary', 'Secondary'], conn: 'StandAlone' },
    stopped: { roles: ['Primary', 'Secondary'], conn: 'StandAlone' },
  };
  for (const stage of PAIR_STAGES) {
    const r = read(m.render({ stage }));
    assert.deepEqual(r.ones('lockstep_pair_stage'), [{ stage }]);
    assert.deepEqual(r.ones('lockstep_pair_role'), [
      { side: 'primary', role: expect[stage]!.roles[0] },
      { side: 'secondary', role: expect[stage]!.roles[1] },
    ]);
    assert.deepEqual(r.ones('lockstep_pair_connection_state'), [{ state: expect[stage]!.conn }]);
  }
});

test('out of sync: 0 while protected, the changed bytes while degraded, what is left of a resync, absent otherwise', () => {
  const m = new PairMetrics();
  const at = (st: Parameters<PairMetrics['render']>[0]) => read(m.render(st)).oos.map((s) => [s.labels, Number(s.value)]);
  assert.deepEqual(at({ stage: 'protected' }), [[{ peer: 'secondary', disk: 'disk' }, 0]]);
  assert.deepEqual(at({ stage: 'degraded', 'changed-bytes': 196608 }), [[{ peer: 'secondary', disk: 'disk' }, 196608]]);
  assert.deepEqual(at({ stage: 'resyncing', resync: { done: 100, total: 4096 } }), [[{ peer: 'secondary', disk: 'disk' }, 3996]]);
  assert.deepEqual(at({ stage: 'failed-over' }), []);
  assert.deepEqual(at({ stage: 'primary-lost' }), []);
  assert.deepEqual(at({ stage: 'split-brain' }), []);
});

test('a resync\'s rate: bytes since it began over the time since; a new resync starts afresh', async () => {
  const { RateMeter } = await import('../../src/pair/metrics.js');
  const r = new RateMeter();
  const a = {};
  assert.equal(r.sample(a, 1000, 10_000), 0);
  assert.equal(r.sample(a, 3000, 12_000), 1000);
  assert.equal(r.sample(a, 5000, 14_000), 1000);
  const b = {};
  assert.equal(r.sample(b, 0, 15_000), 0);
  assert.equal(r.sample(b, 8192, 15_500), 16384);
});

test('counters and histograms carry what was observed', () => {
  const m = new PairMetrics();
  m.checkpoints = 3;
  m.hiddenCopiedBytes = 65536;
  m.writtenBytes = 12288;
  m.sentBytes = 8192;
  m.receivedBytes = 4096;
  m.pause.observe(0.0015);
  m.pause.observe(0.02);
  const f = parsePrometheusTextFormat(m.render({ stage: 'protected' }));
  assert.equal(f.find((x) => x.name === 'lockstep_pair_checkpoints_total')!.type, 'COUNTER');
  assert.equal(f.find((x) => x.name === 'lockstep_pair_hidden_copied_bytes_total')!.metrics[0]!.value, '65536');
  const series = (name: string) => f.find((x) => x.name === name)!.metrics.map((x) => [x.labels ?? {}, x.value]);
  assert.deepEqual(series('lockstep_pair_device_written_bytes_total'), [[{}, '12288']]);
  assert.deepEqual(series('lockstep_pair_peerdevice_sent_bytes_total'), [[{ peer: 'secondary', disk: 'disk' }, '8192']]);
  assert.deepEqual(series('lockstep_pair_peerdevice_received_bytes_total'), [[{ peer: 'primary', disk: 'disk' }, '4096']]);
  const h = f.find((x) => x.name === 'lockstep_pair_checkpoint_pause_seconds')!;
  assert.equal(h.type, 'HISTOGRAM');
  assert.equal(h.metrics[0]!.count, '2');
  assert.equal(h.metrics[0]!.buckets!['0.002'], '1');
  assert.equal(h.metrics[0]!.buckets!['0.025'], '2');
});

test('roles swapped after a failover\'s re-protection: the side started as secondary is the Primary', () => {
  const m = new PairMetrics();
  const r = read(m.render({ stage: 'protected', 'primary-side': 'secondary' }));
  assert.deepEqual(r.ones('lockstep_pair_role'), [
    { side: 'primary', role: 'Secondary' },
    { side: 'secondary', role: 'Primary' },
  ]);
  // the swapped primary lost: the side started as primary serves again
  const back = read(m.render({ stage: 'failed-over', 'primary-side': 'secondary' }));
  assert.deepEqual(back.ones('lockstep_pair_role'), [
    { side: 'primary', role: 'Primary' },
    { side: 'secondary', role: 'Unknown' },
  ]);
  // the out-of-sync gauge names the peer of the side that serves
  const deg = read(m.render({ stage: 'degraded', 'primary-side': 'secondary', 'changed-bytes': 4096 }));
  assert.deepEqual(
    deg.oos.map((x) => [x.labels, x.value]),
    [[{ peer: 'primary', disk: 'disk' }, '4096']],
  );
});

test("each side's disk: consistent 1/0 and one generation series per side, the old id gone once it changes", () => {
  const m = new PairMetrics();
  const at = (st: Parameters<PairMetrics['render']>[0]) => {
    const f = parsePrometheusTextFormat(m.render(st));
    const series = (name: string) => f.find((x) => x.name === name)!.metrics.map((x) => [x.labels ?? {}, x.value]);
    return { consistent: series('lockstep_pair_device_consistent'), generation: series('lockstep_pair_device_generation_info') };
  };
  const side = (generation: string | null, consistent: boolean | null) => ({ 'changed-bytes': null, generation, consistent });
  // a live resync into the secondary: it is inconsistent, on its own (older) generation
  let r = at({ stage: 'resyncing', sides: { primary: side('a1b2c3d4e5f60718', true), secondary: side('0f1e2d3c4b5a6978', false) } });
  assert.deepEqual(r.consistent, [
    [{ side: 'primary' }, '1'],
    [{ side: 'secondary' }, '0'],
  ]);
  assert.deepEqual(r.generation, [
    [{ side: 'primary', generation: 'a1b2c3d4e5f60718' }, '1'],
    [{ side: 'secondary', generation: '0f1e2d3c4b5a6978' }, '1'],
  ]);
  // the resync ended and the primary started a new generation: the old ids are not scraped
  r = at({ stage: 'protected', sides: { primary: side('99aa88bb77cc66dd', true), secondary: side('99aa88bb77cc66dd', true) } });
  assert.deepEqual(r.consistent, [
    [{ side: 'primary' }, '1'],
    [{ side: 'secondary' }, '1'],
  ]);
  assert.deepEqual(r.generation, [
    [{ side: 'primary', generation: '99aa88bb77cc66dd' }, '1'],
    [{ side: 'secondary', generation: '99aa88bb77cc66dd' }, '1'],
  ]);
  // a side whose record is unknown (its host unreachable at start) has neither series
  r = at({ stage: 'degraded', sides: { primary: side('99aa88bb77cc66dd', true), secondary: side(null, null) } });
  assert.deepEqual(r.consistent, [[{ side: 'primary' }, '1']]);
  assert.deepEqual(r.generation, [[{ side: 'primary', generation: '99aa88bb77cc66dd' }, '1']]);
  // a label value is escaped: the parser reads back the same id
  r = at({ stage: 'protected', sides: { primary: side('a"b\\c', true) } });
  assert.deepEqual(r.generation, [[{ side: 'primary', generation: 'a"b\\c' }, '1']]);
});
