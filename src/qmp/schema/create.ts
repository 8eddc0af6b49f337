// blockdev-create's arguments (QEMU 7.2's qapi/block-core.json BlockdevCreateOptions), checked
// the way QEMU's input visitor does: members in schema order, then the first unexpected key
// in GLib's order (qdict-order.ts), options before the command's own members. Sizes are QAPI
// `size` (uint64): any JSON integer passes, a negative one is a huge size that fails later,
// as in QEMU.

import { InvalidArgumentError } from '../../errors.js';
import { firstUnexpected } from './qdict-order.js';

type MemberType = 'str' | 'bool' | 'int' | 'size' | 'BlockdevRef' | 'object' | { readonly enum: readonly string[] };

interface Member {
  readonly name: string;
  readonly type: MemberType;
  readonly optional?: boolean;
}

/** QAPI BlockdevDriver, in QEMU 7.2's order. */
export const BLOCKDEV_DRIVERS: readonly string[] = [
  'blkdebug', 'blklogwrites', 'blkreplay', 'blkverify', 'bochs', 'cloop', 'compress', 'copy-before-write', 'copy-on-read', 'dmg',
  'file', 'snapshot-access', 'ftp', 'ftps', 'gluster', 'host_cdrom', 'host_device', 'http', 'https', 'iscsi', 'luks', 'nbd', 'nfs',
  'null-aio', 'null-co', 'nvme', 'parallels', 'preallocate', 'qcow', 'qcow2', 'qed', 'quorum', 'raw', 'rbd', 'replication', 'ssh',
  'throttle', 'vdi', 'vhdx', 'vmdk', 'vpc', 'vvfat',
];

const PREALLOC = { enum: ['off', 'metadata', 'falloc', 'full'] } as const;

/** The union's branches lockstep implements. */
const BRANCHES: Readonly<Record<string, readonly Member[]>> = {
  file: [
    { name: 'filename', type: 'str' },
    { name: 'size', type: 'size' },
    { name: 'preallocation', type: PREALLOC, optional: true },
    { name: 'nocow', type: 'bool', optional: true },
    { name: 'extent-size-hint', type: 'size', optional: true },
  ],
  qcow2: [
    { name: 'file', type: 'BlockdevRef' },
    { name: 'data-file', type: 'BlockdevRef', optional: true },
    { name: 'data-file-raw', type: 'bool', optional: true },
    { name: 'extended-l2', type: 'bool', optional: true },
    { name: 'size', type: 'size' },
    { name: 'version', type: { enum: ['v2', 'v3'] }, optional: true },
    { name: 'backing-file', type: 'str', optional: true },
    { name: 'backing-fmt', type: { enum: BLOCKDEV_DRIVERS }, optional: true },
    { name: 'encrypt', type: 'object', optional: true },
    { name: 'cluster-size', type: 'size', optional: true },
    { name: 'preallocation', type: PREALLOC, optional: true },
    { name: 'lazy-refcounts', type: 'bool', optional: true },
    { name: 'refcount-bits', type: 'int', optional: true },
    { name: 'compression-type', type: { enum: ['zlib', 'zstd'] }, optional: true },
  ],
};

/** Drivers whose branch QEMU has and lockstep does not implement. */
export const UNIMPLEMENTED_CREATE_DRIVERS: readonly string[] = ['gluster', 'luks', 'nfs', 'parallels', 'qcow', 'qed', 'rbd', 'ssh', 'vdi', 'vhdx', 'vmdk', 'vpc'];

export interface BlockdevCreateArgs {
  jobId: string;
  driver: string;
  /** the options' members (kebab-case, as on the wire), driver included */
  options: Record<string, unknown>;
  /** the driver's branch is empty in QEMU's schema: it has no creation at all */
  noCreate: boolean;
}

function fail(msg: string): never {
  throw new InvalidArgumentError(msg);
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function typeError(path: string, expected: string): never {
  return fail(`Invalid parameter type for '${path}', expected: ${expected}`);
}

function checkMember(t: MemberType, v: unknown, path: string, leaf: string): void {
  if (typeof t === 'object') {
    if (typeof v !== 'string') typeError(path, 'string');
    if (!t.enum.includes(v)) fail(`Parameter '${leaf}' does not accept value '${v}'`);
    return;
  }
  switch (t) {
    case 'str':
      if (typeof v !== 'string') typeError(path, 'string');
      return;
    case 'bool':
      if (typeof v !== 'boolean') typeError(path, 'boolean');
      return;
    case 'int':
      if (typeof v !== 'number' || !Number.isInteger(v)) typeError(path, 'integer');
      return;
    case 'size':
      // QEMU's uint64 takes any integer that fits 64 bits (negative ones wrap)
      if (typeof v !== 'number' || !Number.isInteger(v) || Math.abs(v) > 2 ** 64) fail(`Parameter '${path}' expects uint64`);
      return;
    case 'BlockdevRef':
      // an alternate's type error names the member alone, as QEMU's visitor does
      if (typeof v !== 'string' && !isObject(v)) typeError(leaf, 'BlockdevRef');
      // an inline definition: its driver is checked here as QEMU does; the rest of its
      // members when the job opens it (lockstep has no BlockdevOptions schema)
      if (isObject(v)) {
        if (v['driver'] === undefined) fail(`Parameter '${path}.driver' is missing`);
        checkMember({ enum: BLOCKDEV_DRIVERS }, v['driver'], `${path}.driver`, 'driver');
      }
      return;
    case 'object':
      if (!isObject(v)) typeError(path, 'object');
      return;
  }
}

/** Checks blockdev-create's arguments as QEMU 7.2 does; throws with QEMU's message. */
export function parseBlockdevCreate(args: Record<string, unknown>): BlockdevCreateArgs {
  const jobId = args['job-id'];
  if (jobId === undefined) fail(`Parameter 'job-id' is missing`);
  checkMember('str', jobId, 'job-id', 'job-id');
  const options = args['options'];
  if (options === undefined) fail(`Parameter 'options' is missing`);
  if (!isObject(options)) typeError('options', 'object');

  const driver = options['driver'];
  if (driver === undefined) fail(`Parameter 'options.driver' is missing`);
  checkMember({ enum: BLOCKDEV_DRIVERS }, driver, 'options.driver', 'driver');
  const d = driver as string;
  const visited = ['driver'];
  const branch = BRANCHES[d];
  if (branch) {
    for (const m of branch) {
      const v = options[m.name];
      const path = `options.${m.name}`;
      if (v === undefined) {
        if (!m.optional) fail(`Parameter '${path}' is missing`);
        continue;
      }
      checkMember(m.type, v, path, m.name);
      visited.push(m.name);
    }
  } else if (UNIMPLEMENTED_CREATE_DRIVERS.includes(d)) {
    // QEMU would check this branch's members; lockstep has no such driver to create with
    fail(`Block driver '${d}' not found or not supported`);
  }
  const strangerInOptions = firstUnexpected(Object.keys(options), visited);
  if (strangerInOptions !== undefined) fail(`Parameter 'options.${strangerInOptions}' is unexpected`);
  const stranger = firstUnexpected(Object.keys(args), ['job-id', 'options']);
  if (stranger !== undefined) fail(`Parameter '${stranger}' is unexpected`);
  return { jobId: jobId as string, driver: d, options, noCreate: !branch };
}
