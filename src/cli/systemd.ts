// Readiness for systemd (Type=notify): `systemd-notify --ready` when the service manager gave
// us a notification socket. Node has no Unix datagram sockets, so the message is sent by that
// helper, a child process: the unit needs NotifyAccess=all (see systemd/*.service).

import { spawn } from 'node:child_process';

/**
 * Takes the notification socket out of the environment, so that the processes this one starts
 * (the pair's daemons) cannot announce themselves as the service: with NotifyAccess=all their
 * READY=1 would count as ours, with their pid as the main one.
 */
export function takeNotifySocket(): string | undefined {
  const socket = process.env.NOTIFY_SOCKET;
  delete process.env.NOTIFY_SOCKET;
  return socket || undefined;
}

/** Tells systemd the service is ready; does nothing outside systemd. Never throws. */
export function notifyReady(status?: string, socket = process.env.NOTIFY_SOCKET): void {
  if (!socket) return;
  const args = ['--ready', `--pid=${process.pid}`, ...(status ? [`--status=${status}`] : [])];
  const child = spawn('systemd-notify', args, { stdio: 'ignore', env: { ...process.env, NOTIFY_SOCKET: socket } });
  child.on('error', () => {}); // no systemd-notify: the unit's start times out and says so
  child.unref();
}
