// The pair's byte counters against known traffic: N bytes written over NBD to the served disk
// are N bytes written, N bytes sent by the primary and N bytes received by the secondary, as
// the daemons count them and as the scrape shows them.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import parsePrometheusTextFormat from 'parse-prometheus-text-format';
import { PairSupervisor } from '../../src/pair/supervisor.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import { tempDir } from '../helpers/graph.js';

const MiB = 1024 * 1024;

test('written, sent and received bytes equal the bytes written to the served disk', async (t) => {
  const dir = tempDir(t);
  const sup = new PairSupervisor({
    dataDir: dir,
    size: 8 * MiB,
    checkpointIntervalMs: 0,
    heartbeatIntervalMs: 50,
    heartbeatTimeoutMs: 5000,
    failover: 'auto',
    nbdSocket: join(dir, 'disk.sock'),
    log: () => {},
  });
  t.after(() => sup.stop());
  await sup.start();
  assert.equal(sup.stage, 'protected');
  const client = await NbdClient.connect({ address: { type: 'unix', path: join(dir, 'disk.sock') }, exportName: 'disk' });
  t.after(() => client.destroy());
  // unaligned writes and a write-zeroes: every byte counts once, whatever the alignment
  let n = 0;
  for (let i = 0; i < 10; i++) {
    await client.write(i * 300_000 + 17, Buffer.alloc(4097 + i, 0x40 + i));
    n += 4097 + i;
  }
  await client.writeZeroes(5 * MiB, 65536);
  n += 65536;
  await sup.checkpoint();
  const scrape = parsePrometheusTextFormat(sup.metrics.render(sup.status()));
  const value = (name: string) => {
    const f = scrape.find((x) => x.name === name);
    assert.ok(f, `${name} is in the scrape`);
    assert.equal(f.type, 'COUNTER');
    return f.metrics.map((m) => [m.labels ?? {}, Number(m.value)]);
  };
  assert.deepEqual(value('lockstep_pair_device_written_bytes_total'), [[{}, n]]);
  assert.deepEqual(value('lockstep_pair_peerdevice_sent_bytes_total'), [[{ peer: 'secondary', disk: 'disk' }, n]]);
  assert.deepEqual(value('lockstep_pair_peerdevice_received_bytes_total'), [[{ peer: 'primary', disk: 'disk' }, n]]);
  // more writes: the counters move by exactly those at the next checkpoint
  await client.write(7 * MiB, Buffer.alloc(12345, 0x99));
  await sup.checkpoint();
  assert.equal(sup.metrics.writtenBytes, n + 12345);
  assert.equal(sup.metrics.sentBytes, n + 12345);
  assert.equal(sup.metrics.receivedBytes, n + 12345);
});
