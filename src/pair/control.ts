// The supervisor's control socket: JSON lines over a Unix socket.
//   -> {"cmd": "status" | "checkpoint" | "failover" | "reprotect"}
//   -> {"cmd": "resolve", "keep": "primary" | "secondary"}
//   <- {"ok": true, "result": ...} | {"ok": false, "error": "...", "code"?: "ENOSPLIT" | ...}
// `lockstep pair status|checkpoint|failover|reprotect|resolve` are its clients.

import { createServer, connect, type Server } from 'node:net';
import { existsSync, rmSync } from 'node:fs';
import { errorMessage } from '../errors.js';
import type { PairSupervisor } from './supervisor.js';

const MAX_LINE = 64 * 1024;

export function serveControl(sup: PairSupervisor, path: string): Promise<Server> {
  rmSync(path, { force: true });
  const server = createServer((sock) => {
    let buf = '';
    sock.setEncoding('utf8');
    sock.on('error', () => sock.destroy());
    sock.on('data', (chunk: string) => {
      buf += chunk;
      if (buf.length > MAX_LINE) {
        sock.end(JSON.stringify({ ok: false, error: 'request too long' }) + '\n');
        return;
      }
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        void handle(line).then((reply) => sock.write(JSON.stringify(reply) + '\n'));
      }
    });
  });
  const handle = async (line: string): Promise<Record<string, unknown>> => {
    let cmd: unknown;
    let req: Record<string, unknown>;
    try {
      req = JSON.parse(line) as Record<string, unknown>;
      cmd = req.cmd;
    } catch {
      return { ok: false, error: 'malformed JSON' };
    }
    try {
      switch (cmd) {
        case 'status':
          return { ok: true, result: sup.status() };
        case 'checkpoint':
          return { ok: true, result: await sup.checkpoint() };
        case 'failover':
          await sup.failover('requested by the operator');
          return { ok: true, result: sup.status() };
        case 'reprotect':
          await sup.reprotect();
          return { ok: true, result: sup.status() };
        case 'resolve':
          return { ok: true, result: { ...(await sup.resolve(String(req.keep))), status: sup.status() } };
        default:
          return { ok: false, error: `unknown command '${String(cmd)}' (status, checkpoint, failover, reprotect, resolve)` };
      }
    } catch (e) {
      const code = (e as { code?: unknown }).code;
      return { ok: false, error: errorMessage(e), ...(typeof code === 'string' ? { code } : {}) };
    }
  };
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(path, () => resolve(server));
  });
}

/**
 * Before a supervisor starts: a control socket someone listens on belongs to a supervisor
 * that runs (refused, naming it); one nobody listens on was left by a supervisor that died
 * (removed, and reported so that the caller can say it).
 */
export async function claimControl(path: string): Promise<'free' | 'stale-removed'> {
  if (!existsSync(path)) return 'free';
  const live = await new Promise<boolean>((resolve) => {
    const sock = connect(path);
    const timer = setTimeout(() => {
      // accepted but silent: someone listens
      sock.destroy();
      resolve(true);
    }, 2000);
    sock.once('connect', () => {
      clearTimeout(timer);
      sock.destroy();
      resolve(true);
    });
    sock.once('error', (e: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      // ECONNREFUSED: a socket file without a listener; ENOENT: gone meanwhile
      resolve(e.code !== 'ECONNREFUSED' && e.code !== 'ENOENT' && e.code !== 'ENOTSOCK');
    });
  });
  if (live) {
    throw new Error(`another lockstep pair supervisor answers on ${path}: stop it first (lockstep pair status --control ${path} shows it), or give this one another --data-dir or --control`);
  }
  rmSync(path, { force: true });
  return 'stale-removed';
}

export function controlRequest(path: string, cmd: string, timeoutMs = 60_000, args: Record<string, unknown> = {}): Promise<{ ok: boolean; result?: unknown; error?: string; code?: string }> {
  return new Promise((resolve, reject) => {
    const sock = connect(path);
    let buf = '';
    const timer = setTimeout(() => {
      sock.destroy();
      reject(new Error(`no answer from ${path}`));
    }, timeoutMs);
    sock.setEncoding('utf8');
    sock.on('connect', () => sock.write(JSON.stringify({ ...args, cmd }) + '\n'));
    sock.on('data', (d: string) => {
      buf += d;
      const nl = buf.indexOf('\n');
      if (nl >= 0) {
        clearTimeout(timer);
        sock.end();
        try {
          resolve(JSON.parse(buf.slice(0, nl)) as { ok: boolean });
        } catch (e) {
          reject(e as Error);
        }
      }
    });
    sock.on('error', (e) => {
      clearTimeout(timer);
      reject(new Error(`cannot reach the pair supervisor at ${path}: ${e.message}`));
    });
  });
}
