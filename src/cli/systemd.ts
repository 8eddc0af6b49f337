// Readiness for systemd (Type=notify): `systemd-notify --ready` when the service manager gave
// us a notification socket. Node has no Unix datagram sockets, so the message is sent by that
// helper, a child process: the unit needs NotifyAccess=all (see systemd/*.service).

import { spawn } from 'node:child_process';

/** Tells systemd the service is ready; does nothing outside systemd. Never throws. */
export function notifyReady(status?: string): void {
  if (!process.env.NOTIFY_SOCKET) return;
  const args = ['--ready', `--pid=${process.pid}`, ...(status ? [`--status=${status}`] : [])];
  const child = spawn('systemd-notify', args, { stdio: 'ignore' });
  child.on('error', () => {}); // no systemd-notify: the unit's start times out and says so
  child.unref();
}
