// A test-only filter that decides when each write, write-zeroes or discard passing through
// it reaches its file child: at once, after a delay the test picks per request, or only
// when the test opens the gate for it. It records the order in which they completed below,
// so that a test can compare the order two children applied overlapping requests in.
import { makeCaps, type BlockDriver, type NodeImpl } from '../../src/block/driver.js';
import type { BlockNode } from '../../src/block/node.js';

export type GateOp = 'write' | 'zero' | 'discard';

export interface GateRequest {
  op: GateOp;
  offset: number;
  length: number;
  /** first byte of the data (a write's tag), -1 for zeroes and discards */
  tag: number;
}

export interface GateControl {
  /** when true, mutations wait in `waiting` until the test calls open() on them */
  closed: boolean;
  /** a delay in ms for each mutation (when the gate is open), or none */
  delay: ((r: GateRequest) => number) | null;
  readonly waiting: Array<GateRequest & { open(): void }>;
  /** mutations in the order they completed on the file child */
  readonly completed: GateRequest[];
  /** resolves when `n` mutations are waiting at the closed gate */
  waitingCount(n: number): Promise<void>;
  /** opens the gate for everything waiting and for what comes next */
  openAll(): void;
}

export const gateDriver: BlockDriver = {
  name: 'test-gate',
  kind: 'filter',
  async open(ctx, o): Promise<NodeImpl> {
    const fileOpt = o.raw('file');
    o.done();
    const file = (await ctx.openChild('file', fileOpt, { required: true }))!;
    const watchers: Array<() => void> = [];
    const control: GateControl = {
      closed: false,
      delay: null,
      waiting: [],
      completed: [],
      async waitingCount(n) {
        while (control.waiting.length < n) await new Promise<void>((r) => watchers.push(r));
      },
      openAll() {
        control.closed = false;
        for (const w of control.waiting.splice(0)) w.open();
      },
    };
    const pass = async (r: GateRequest, run: () => Promise<void>): Promise<void> => {
      if (control.closed) {
        await new Promise<void>((open) => {
          control.waiting.push({ ...r, open });
          for (const w of watchers.splice(0)) w();
        });
      } else if (control.delay) {
        const ms = control.delay(r);
        if (ms > 0) await new Promise((res) => setTimeout(res, ms));
      }
      await run();
      control.completed.push(r);
    };
    const impl: NodeImpl & { control: GateControl } = {
      control,
      caps: makeCaps({ filter: true, writeZeroes: true, discard: true, requestAlignment: file.caps.requestAlignment }),
      get filename() {
        return file.filename;
      },
      getLength: () => file.getLength(),
      read: (offset, length) => file.read(offset, length),
      write: (offset, data, flags) =>
        pass({ op: 'write', offset, length: data.length, tag: data[0] ?? -1 }, () => file.write(offset, data, flags)),
      writeZeroes: (offset, length, flags) =>
        pass({ op: 'zero', offset, length, tag: -1 }, () => file.writeZeroes(offset, length, flags)),
      discard: (offset, length) => pass({ op: 'discard', offset, length, tag: -1 }, () => file.discard(offset, length)),
      flush: () => file.flush(),
      close: async () => {},
    };
    return impl;
  },
};

export function gateControl(node: BlockNode): GateControl {
  return (node.impl as NodeImpl & { control: GateControl }).control;
}
