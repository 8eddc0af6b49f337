// Two test hosts on one machine: network namespaces joined by a veth pair, made and removed
// by the test itself. Needs root and iproute2; in CI their absence fails the test.

import { spawnSync } from 'node:child_process';

export interface TestHost {
  ns: string;
  ip: string;
  dev: string;
}

export interface TestNetwork {
  a: TestHost;
  b: TestHost;
  /** pulls the cable: both ends down, so packets vanish without a reset */
  cut(): void;
  heal(): void;
  remove(): void;
}

function ip(args: string[]): void {
  const r = spawnSync('ip', args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`ip ${args.join(' ')}: ${r.stderr.trim() || r.error?.message}`);
}

/** Whether namespaces can be made here; throws in CI when they cannot. */
export function canMakeNetns(): boolean {
  const name = `lsprobe${process.pid}`;
  const r = spawnSync('ip', ['netns', 'add', name], { encoding: 'utf8' });
  if (r.status === 0) {
    spawnSync('ip', ['netns', 'del', name]);
    return true;
  }
  const why = r.error ? r.error.message : r.stderr.trim();
  if (process.env.CI) throw new Error(`network namespaces are required in CI: ip netns add failed: ${why}`);
  return false;
}

/** Makes two namespaces 10.X.Y.1 and 10.X.Y.2 (Y from `id`, X from the pid). */
export function makeNetwork(id: number): TestNetwork {
  const tag = `${process.pid % 10000}x${id}`;
  const sub = `10.${200 + (process.pid % 50)}.${id % 250}`;
  const a: TestHost = { ns: `lsa${tag}`, ip: `${sub}.1`, dev: `lsa${tag}` };
  const b: TestHost = { ns: `lsb${tag}`, ip: `${sub}.2`, dev: `lsb${tag}` };
  const remove = (): void => {
    for (const h of [a, b]) spawnSync('ip', ['netns', 'del', h.ns]);
  };
  remove();
  try {
    ip(['netns', 'add', a.ns]);
    ip(['netns', 'add', b.ns]);
    ip(['link', 'add', a.dev, 'type', 'veth', 'peer', 'name', b.dev]);
    for (const h of [a, b]) {
      ip(['link', 'set', h.dev, 'netns', h.ns]);
      ip(['-n', h.ns, 'addr', 'add', `${h.ip}/24`, 'dev', h.dev]);
      ip(['-n', h.ns, 'link', 'set', h.dev, 'up']);
      ip(['-n', h.ns, 'link', 'set', 'lo', 'up']);
    }
  } catch (e) {
    remove();
    throw e;
  }
  return {
    a,
    b,
    cut: () => {
      for (const h of [a, b]) ip(['-n', h.ns, 'link', 'set', h.dev, 'down']);
    },
    heal: () => {
      for (const h of [a, b]) ip(['-n', h.ns, 'link', 'set', h.dev, 'up']);
    },
    remove,
  };
}
