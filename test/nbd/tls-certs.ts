// Makes a CA, a server certificate (localhost, 127.0.0.1) and a client certificate with
// openssl, in QEMU's tls-creds-x509 directory layout (one directory per endpoint).
import { spawnSync } from 'node:child_process';
import { copyFileSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

export function haveOpenssl(): boolean {
  return spawnSync('openssl', ['version']).status === 0;
}

function ossl(cwd: string, args: string[]): void {
  const r = spawnSync('openssl', args, { cwd, encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`openssl ${args.join(' ')}: ${r.stderr}`);
}

const KEY = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];

/**
 * Returns { serverDir, clientDir, otherCaDir, bothDir } (otherCaDir: a client trusting a
 * different CA; otherClientDir: a client whose certificate another CA signed; bothDir: server
 * and client credentials together, as a pair host uses them). `ips` are added to the server
 * certificate's subjectAltName.
 */
export function makeCerts(
  root: string,
  opts: { ips?: string[] } = {},
): { serverDir: string; clientDir: string; otherCaDir: string; otherClientDir: string; bothDir: string } {
  const work = join(root, 'pki');
  mkdirSync(work, { recursive: true });
  ossl(work, ['req', '-x509', ...KEY, '-keyout', 'ca-key.pem', '-out', 'ca-cert.pem', '-days', '2', '-subj', '/CN=lockstep test CA']);
  ossl(work, ['req', '-x509', ...KEY, '-keyout', 'other-key.pem', '-out', 'other-cert.pem', '-days', '2', '-subj', '/CN=other CA']);
  const ips = ['127.0.0.1', ...(opts.ips ?? [])].map((i) => `IP:${i}`).join(',');
  writeFileSync(join(work, 'server.ext'), `subjectAltName=DNS:localhost,${ips}\n`);
  for (const who of ['server', 'client']) {
    ossl(work, ['req', ...KEY, '-keyout', `${who}-key.pem`, '-out', `${who}.csr`, '-subj', `/CN=${who === 'server' ? 'localhost' : 'lockstep client'}`]);
    const ext = who === 'server' ? ['-extfile', 'server.ext'] : [];
    ossl(work, ['x509', '-req', '-in', `${who}.csr`, '-CA', 'ca-cert.pem', '-CAkey', 'ca-key.pem', '-CAcreateserial', '-out', `${who}-cert.pem`, '-days', '2', ...ext]);
  }
  // a client certificate from the other CA: a server that verifies peers must refuse it
  ossl(work, ['req', ...KEY, '-keyout', 'rogue-key.pem', '-out', 'rogue.csr', '-subj', '/CN=rogue client']);
  ossl(work, ['x509', '-req', '-in', 'rogue.csr', '-CA', 'other-cert.pem', '-CAkey', 'other-key.pem', '-CAcreateserial', '-out', 'rogue-cert.pem', '-days', '2']);
  const serverDir = join(root, 'server');
  const clientDir = join(root, 'client');
  const otherCaDir = join(root, 'other');
  const otherClientDir = join(root, 'rogue');
  const bothDir = join(root, 'both');
  for (const d of [serverDir, clientDir, otherCaDir, otherClientDir, bothDir]) mkdirSync(d);
  for (const f of ['ca-cert.pem', 'server-cert.pem', 'server-key.pem', 'client-cert.pem', 'client-key.pem']) copyFileSync(join(work, f), join(bothDir, f));
  copyFileSync(join(work, 'ca-cert.pem'), join(otherClientDir, 'ca-cert.pem'));
  copyFileSync(join(work, 'rogue-cert.pem'), join(otherClientDir, 'client-cert.pem'));
  copyFileSync(join(work, 'rogue-key.pem'), join(otherClientDir, 'client-key.pem'));
  for (const f of ['ca-cert.pem', 'server-cert.pem', 'server-key.pem']) copyFileSync(join(work, f), join(serverDir, f));
  for (const f of ['ca-cert.pem', 'client-cert.pem', 'client-key.pem']) copyFileSync(join(work, f), join(clientDir, f));
  copyFileSync(join(work, 'other-cert.pem'), join(otherCaDir, 'ca-cert.pem'));
  return { serverDir, clientDir, otherCaDir, otherClientDir, bothDir };
}
