// A line-level QMP client that keeps every message in arrival order, for tests that send the
// same conversation to QEMU (qemu-storage-daemon) and to `lockstep daemon` and compare the
// replies; and starting qemu-storage-daemon with a monitor socket.

import { connect, type Socket } from 'node:net';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';

export type Msg = Record<string, unknown>;

export class Transcript {
  private buf = '';
  private readonly queue: Msg[] = [];
  private waiter: (() => void) | null = null;
  private constructor(private readonly sock: Socket) {
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => {
      this.buf += d;
      for (let i = this.buf.indexOf('\n'); i >= 0; i = this.buf.indexOf('\n')) {
        const line = this.buf.slice(0, i).trim();
        this.buf = this.buf.slice(i + 1);
        if (line) this.queue.push(JSON.parse(line) as Msg);
      }
      this.waiter?.();
    });
  }

  /**
   * Connects to the monitor at `path`. A server binds its socket file before it listens, so a
   * refused (or not yet created) socket is retried for up to 10 s.
   */
  static async open(path: string): Promise<Transcript> {
    let sock: Socket;
    for (let attempt = 0; ; attempt++) {
      sock = connect(path);
      try {
        await new Promise<void>((resolve, reject) => sock.once('connect', resolve).once('error', reject));
        break;
      } catch (e) {
        sock.destroy();
        const code = (e as NodeJS.ErrnoException).code;
        if ((code !== 'ECONNREFUSED' && code !== 'ENOENT') || attempt >= 200) throw e;
        await new Promise((r) => setTimeout(r, 50));
      }
    }
    const t = new Transcript(sock);
    await t.next(); // greeting
    return t;
  }

  private async next(): Promise<Msg> {
    for (let i = 0; i < 400 && this.queue.length === 0; i++) {
      await new Promise<void>((r) => {
        const timer = setTimeout(r, 50);
        this.waiter = () => {
          clearTimeout(timer);
          r();
        };
      });
    }
    const m = this.queue.shift();
    if (!m) throw new Error('no QMP message within 20 s');
    return m;
  }

  /** Sends one request and returns its reply; events that arrive meanwhile are dropped. */
  async reply(request: Msg): Promise<Msg> {
    this.sock.write(JSON.stringify(request) + '\n');
    for (;;) {
      const m = await this.next();
      if (!('event' in m)) return m;
    }
  }

  close(): void {
    this.sock.destroy();
  }
}

/** qemu-storage-daemon with a QMP monitor at dir/qemu.qmp (plus `args`). */
export async function startQsd(dir: string, args: string[] = []): Promise<{ path: string; proc: ChildProcess }> {
  const path = join(dir, 'qemu.qmp');
  const proc = spawn('qemu-storage-daemon', [...args, '--chardev', `socket,id=m0,path=${path},server=on,wait=off`, '--monitor', 'chardev=m0'], {
    stdio: 'ignore',
  });
  for (let i = 0; i < 200 && !existsSync(path); i++) await new Promise((r) => setTimeout(r, 50));
  return { path, proc };
}

/** Replaces `$D` in every string of a request by `dir`. */
export function substitute(v: unknown, dir: string): unknown {
  if (typeof v === 'string') return v.split('$D').join(dir);
  if (Array.isArray(v)) return v.map((x) => substitute(x, dir));
  if (typeof v === 'object' && v !== null) return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, substitute(x, dir)]));
  return v;
}

/** Replaces `dir` in a message by `$D`. */
export function mask<T>(msg: T, dir: string): T {
  return JSON.parse(JSON.stringify(msg).split(dir).join('$D')) as T;
}
