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

/** Returns { serverDir, clientDir, otherCaDir } (otherCaDir: a client trusting a different CA). */
export function makeCerts(root: string): { serverDir: string; clientDir: string; otherCaDir: string } {
  const work = join(root, 'pki');
  mkdirSync(work, { recursive: true });
  ossl(work, ['req', '-x509', ...KEY, '-keyout', 'ca-key.pem', '-out', 'ca-cert.pem', '-days', '2', '-subj', '/CN=lockstep test CA']);
  ossl(work, ['req', '-x509', ...KEY, '-keyout', 'other-key.pem', '-out', 'other-cert.pem', '-days', '2', '-subj', '/CN=other CA']);
  writeFileSync(join(work, 'server.ext'), 'subjectAltName=DNS:localhost,IP:127.0.0.1\n');
  for (const who of ['server', 'client']) {
    ossl(work, ['req', ...KEY, '-keyout', `${who}-key.pem`, '-out', `${who}.csr`, '-subj', `/CN=${who === 'server' ? 'localhost' : 'lockstep client'}`]);
    const ext = who === 'server' ? ['-extfile', 'server.ext'] : [];
    ossl(work, ['x509', '-req', '-in', `${who}.csr`, '-CA', 'ca-cert.pem', '-CAkey', 'ca-key.pem', '-CAcreateserial', '-out', `${who}-cert.pem`, '-days', '2', ...ext]);
  }
  const serverDir = join(root, 'server');
  const clientDir = join(root, 'client');
  const otherCaDir = join(root, 'other');
  for (const d of [serverDir, clientDir, otherCaDir]) mkdirSync(d);
  for (const f of ['ca-cert.pem', 'server-cert.pem', 'server-key.pem']) copyFileSync(join(work, f), join(serverDir, f));
  for (const f of ['ca-cert.pem', 'client-cert.pem', 'client-key.pem']) copyFileSync(join(work, f), join(clientDir, f));
  copyFileSync(join(work, 'other-cert.pem'), join(otherCaDir, 'ca-cert.pem'));
  return { serverDir, clientDir, otherCaDir };
}
