// Filter driver "blkdebug": fault injection for tests, with QEMU's option names.
//
// Options:
//   image          BlockdevRef, the filtered node (attached under the role `file`)
//   inject-error   list of { event, state?, iotype? (one of read, write, write-zeroes,
//                  discard, flush, block-status; default: all but block-status),
//                  errno? (default 5 = EIO; 0 injects nothing), sector? (512-byte units,
//                  default: any), once? (default false), immediately? (accepted: the error
//                  always comes back through the request's promise) }
//   set-state      list of { event, state?, new_state }
//   align          request alignment (power of two; default: the image's)
//   max-transfer   largest request (a multiple of align; default: the image's)
//   opt-write-zero, max-write-zero, opt-discard, max-discard: accepted, not used
//   config         refused (no config files)
// Lists come as JSON arrays or, from keyval, as dicts with keys "0", "1", ...
//
// Events: a rule fires when its event happens while the node's state matches the rule's
// (state 0 or absent: any state; the node starts in state 1). This node raises events for
// its own requests - read_aio before a read, write_aio before a data or zero write,
// flush_to_disk before a flush - and `none` once when it is opened. (QEMU raises most events
// from the format driver above; lockstep's drivers raise none, so blkdebug raises these.)
// A fired inject-error rule becomes active: every later request of the rule's iotype whose
// range covers `sector` (if given) fails with errno; a `once` rule is removed after its first
// failure. set-state rules switch the state.
//
// query output: info() gives { state, 'active-rules' }.

import { makeCaps, type BlockDriver, type NodeImpl } from '../driver.js';
import { BlockError, ERRNO, InvalidArgumentError, type ErrorCode } from '../../errors.js';
import { OptionReader, isDict } from '../options.js';

export const BLKDEBUG_EVENTS = [
  'l1_update', 'l1_grow_alloc_table', 'l1_grow_write_table', 'l1_grow_activate_table',
  'l2_load', 'l2_update', 'l2_update_compressed', 'l2_alloc_cow_read', 'l2_alloc_write',
  'read_aio', 'read_backing_aio', 'read_compressed', 'write_aio', 'write_compressed',
  'vmstate_load', 'vmstate_save', 'cow_read', 'cow_write', 'reftable_load', 'reftable_grow',
  'reftable_update', 'refblock_load', 'refblock_update', 'refblock_update_part',
  'refblock_alloc', 'refblock_alloc_hookup', 'refblock_alloc_write',
  'refblock_alloc_write_blocks', 'refblock_alloc_write_table', 'refblock_alloc_switch_table',
  'cluster_alloc', 'cluster_alloc_bytes', 'cluster_free', 'flush_to_os', 'flush_to_disk',
  'pwritev_rmw_head', 'pwritev_rmw_after_head', 'pwritev_rmw_tail', 'pwritev_rmw_after_tail',
  'pwritev', 'pwritev_zero', 'pwritev_done', 'empty_image_prepare', 'l1_shrink_write_table',
  'l1_shrink_free_l2_clusters', 'cor_write', 'cluster_alloc_space', 'none',
] as const;
export type BlkdebugEvent = (typeof BLKDEBUG_EVENTS)[number];

export const BLKDEBUG_IO_TYPES = ['read', 'write', 'write-zeroes', 'discard', 'flush', 'block-status'] as const;
export type BlkdebugIoType = (typeof BLKDEBUG_IO_TYPES)[number];

interface InjectRule {
  kind: 'inject';
  event: BlkdebugEvent;
  state: number;
  iotypes: Set<BlkdebugIoType>;
  errno: number;
  /** byte offset the request must cover, or -1 for any */
  offset: number;
  once: boolean;
  immediately: boolean;
}

interface SetStateRule {
  kind: 'set-state';
  event: BlkdebugEvent;
  state: number;
  newState: number;
}

type Rule = InjectRule | SetStateRule;

const CODE_BY_ERRNO = new Map<number, ErrorCode>(Object.entries(ERRNO).map(([code, n]) => [n, code as ErrorCode]));

function injectedError(errno: number): BlockError {
  const code = CODE_BY_ERRNO.get(errno);
  if (code) return new BlockError(code);
  return new BlockError('EIO', `Injected error (errno ${errno})`);
}

/** A list option: a JSON array, or a keyval dict with keys "0".."n-1". */
export function listOption(value: unknown, path: string): unknown[] {
  if (value === undefined) return [];
  if (Array.isArray(value)) return value;
  if (isDict(value)) {
    const keys = Object.keys(value);
    const out: unknown[] = [];
    for (let i = 0; i < keys.length; i++) {
      if (!(String(i) in value)) throw new InvalidArgumentError(`Parameter '${path}.${i}' is missing`);
      out.push(value[String(i)]);
    }
    return out;
  }
  throw new InvalidArgumentError(`Invalid parameter type for '${path}', expected: array`);
}

function elementReader(value: unknown, path: string, keyval: boolean): OptionReader {
  if (!isDict(value)) throw new InvalidArgumentError(`Invalid parameter type for '${path}', expected: object`);
  return new OptionReader(value, path, keyval);
}

function parseRules(o: OptionReader): Rule[] {
  const rules: Rule[] = [];
  const injPath = o.path('inject-error');
  listOption(o.raw('inject-error'), injPath).forEach((v, i) => {
    const r = elementReader(v, `${injPath}.${i}`, o.keyval);
    const event = r.enumOf('event', BLKDEBUG_EVENTS, true);
    const state = r.int('state') ?? 0;
    // one I/O type, as in QEMU; by default every type but block-status
    const iotype = r.enumOf('iotype', BLKDEBUG_IO_TYPES);
    const iotypes = new Set<BlkdebugIoType>(iotype ? [iotype] : BLKDEBUG_IO_TYPES.filter((t) => t !== 'block-status'));
    const errno = r.int('errno') ?? ERRNO.EIO;
    if (errno < 0) throw new InvalidArgumentError(`Parameter '${r.path('errno')}' must be an errno number (0 injects nothing)`);
    const sector = r.int('sector') ?? -1;
    const once = r.bool('once', false);
    const immediately = r.bool('immediately', false);
    r.done();
    rules.push({ kind: 'inject', event, state, iotypes, errno, offset: sector < 0 ? -1 : sector * 512, once, immediately });
  });
  const ssPath = o.path('set-state');
  listOption(o.raw('set-state'), ssPath).forEach((v, i) => {
    const r = elementReader(v, `${ssPath}.${i}`, o.keyval);
    const event = r.enumOf('event', BLKDEBUG_EVENTS, true);
    const state = r.int('state') ?? 0;
    const newState = r.int('new_state', true);
    r.done();
    rules.push({ kind: 'set-state', event, state, newState });
  });
  return rules;
}

class BlkdebugState {
  state = 1;
  readonly active: InjectRule[] = [];
  constructor(private readonly rules: Rule[]) {}

  fire(event: BlkdebugEvent): void {
    let newState = this.state;
    for (const rule of this.rules) {
      if (rule.event !== event || (rule.state !== 0 && rule.state !== this.state)) continue;
      if (rule.kind === 'inject') {
        if (!this.active.includes(rule)) this.active.unshift(rule);
      } else {
        newState = rule.newState;
      }
    }
    this.state = newState;
  }

  /** Throws the injected error for this request, if an active rule matches it. */
  check(offset: number, length: number, type: BlkdebugIoType): void {
    const rule = this.active.find(
      (r) => r.iotypes.has(type) && (r.offset === -1 || (length > 0 && r.offset >= offset && r.offset < offset + length)),
    );
    if (!rule || rule.errno === 0) return;
    if (rule.once) {
      this.active.splice(this.active.indexOf(rule), 1);
      const i = this.rules.indexOf(rule);
      if (i >= 0) this.rules.splice(i, 1);
    }
    throw injectedError(rule.errno);
  }
}

export const blkdebugDriver: BlockDriver = {
  name: 'blkdebug',
  kind: 'filter',
  async open(ctx, o): Promise<NodeImpl> {
    if (o.has('config')) {
      throw new InvalidArgumentError(`Parameter 'config' is not supported: blkdebug config files are not read; use inject-error and set-state`);
    }
    const imageOpt = o.raw('image');
    if (imageOpt === undefined || imageOpt === null) throw new InvalidArgumentError(`Parameter '${o.path('image')}' is missing`);
    const align = o.uint('align');
    if (align !== undefined && (align < 1 || (align & (align - 1)) !== 0)) {
      throw new InvalidArgumentError(`Cannot meet constraints with align ${align}`);
    }
    const maxTransfer = o.uint('max-transfer');
    for (const k of ['opt-write-zero', 'max-write-zero', 'opt-discard', 'max-discard']) o.uint(k);
    const rules = parseRules(o);
    o.done();
    const file = (await ctx.openChild('file', imageOpt, { required: true }))!;
    const requestAlignment = Math.max(align ?? 1, file.caps.requestAlignment);
    const mt = maxTransfer ?? file.caps.maxTransfer;
    if (mt < requestAlignment || mt % requestAlignment !== 0) {
      throw new InvalidArgumentError(`Cannot meet constraints with max-transfer ${mt}`);
    }
    const st = new BlkdebugState(rules);
    st.fire('none');
    return {
      caps: makeCaps({
        requestAlignment,
        maxTransfer: mt,
        fua: true,
        writeZeroes: true,
        discard: true,
        blockStatus: true,
        filter: true,
        growable: file.caps.growable ?? false,
      }),
      get filename() {
        return file.filename;
      },
      getLength: () => file.getLength(),
      read: async (offset, length) => {
        st.fire('read_aio');
        st.check(offset, length, 'read');
        return file.read(offset, length);
      },
      write: async (offset, data, flags) => {
        st.fire('write_aio');
        st.check(offset, data.length, 'write');
        return file.write(offset, data, flags);
      },
      writeZeroes: async (offset, length, flags) => {
        st.fire('write_aio');
        st.check(offset, length, 'write-zeroes');
        return file.writeZeroes(offset, length, flags);
      },
      discard: async (offset, length) => {
        st.check(offset, length, 'discard');
        return file.discard(offset, length);
      },
      flush: async () => {
        st.fire('flush_to_disk');
        st.check(0, 0, 'flush');
        return file.flush();
      },
      blockStatus: async (offset, length) => {
        st.check(offset, length, 'block-status');
        return file.blockStatus(offset, length);
      },
      info: () => ({ state: st.state, 'active-rules': st.active.length }),
      close: async () => {},
    };
  },
};
