// Asynchronous QMP events: `{"timestamp": {"seconds", "microseconds"}, "event", "data"}`.
// One bus per daemon; every negotiated monitor connection subscribes to it.

import { EventEmitter } from 'node:events';

export interface QmpTimestamp {
  seconds: number;
  microseconds: number;
}

export interface QmpEventMessage {
  timestamp: QmpTimestamp;
  event: string;
  data?: Record<string, unknown>;
}

export function qmpTimestamp(nowMs: number = Date.now()): QmpTimestamp {
  const micros = Math.floor(nowMs * 1000);
  return { seconds: Math.floor(micros / 1e6), microseconds: micros % 1e6 };
}

export class EventBus extends EventEmitter {
  /** Emits `name` to every subscribed monitor; `data` is omitted when undefined, as QEMU does. */
  emitEvent(name: string, data?: Record<string, unknown>): QmpEventMessage {
    const msg: QmpEventMessage = { timestamp: qmpTimestamp(), event: name };
    if (data !== undefined) msg.data = data;
    this.emit('event', msg);
    return msg;
  }

  subscribe(fn: (msg: QmpEventMessage) => void): () => void {
    this.on('event', fn);
    return () => this.off('event', fn);
  }
}
