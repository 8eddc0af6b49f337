// Test helpers: x509 credentials in QEMU's directory layout, made with openssl.

import { execFileSync, spawnSync } from 'node:child_process';
import { mkdirSync, copyFileSync } from 'node:fs';
import { join } from 'node:path';

export function haveTool(name: string, args: string[] = ['--version']): boolean {
  const r = spawnSync(name, args, { stdio: 'ignore' });
  return r.error === undefined;
}

/** Fails under CI, skips otherwise, when a required external tool is missing. */
export function requireTool(t: { skip(msg: string): void }, name: string, args?: string[]): boolean {
  if (haveTool(name, args)) return true;
  if (process.env.CI) throw new Error(`${name} is required under CI but is not installed`);
  t.skip(`${name} is not installed`);
  return false;
}

function openssl(args: string[], cwd: string): void {
  execFileSync('openssl', args, { cwd, stdio: 'pipe' });
}

export interface TlsDirs {
  /** server endpoint: ca-cert.pem, server-cert.pem, server-key.pem */
  server: string;
  /** client endpoint signed by the same CA: ca-cert.pem, client-cert.pem, client-key.pem */
  client: string;
  /** a client whose certificate comes from another CA (trusts the real CA though) */
  rogue: string;
  /** a client with no certificate at all (ca-cert.pem only) */
  anonymous: string;
}

/** Makes a CA, a server certificate for 127.0.0.1/localhost, and client certificates. */
export function makeTlsDirs(base: string): TlsDirs {
  const work = join(base, 'pki');
  mkdirSync(work, { recursive: true });
  const subj = (cn: string) => ['-subj', `/CN=${cn}`];
  const ca = (name: string) => {
    openssl(['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2', '-keyout', `${name}-key.pem`, '-out', `${name}-cert.pem`, ...subj(name)], work);
  };
  const leaf = (name: string, caName: string, ext: string) => {
    openssl(['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${name}-key.pem`, '-out', `${name}.csr`, ...subj(name === 'server' ? 'localhost' : name)], work);
    openssl(
      ['x509', '-req', '-in', `${name}.csr`, '-CA', `${caName}-cert.pem`, '-CAkey', `${caName}-key.pem`, '-CAcreateserial', '-days', '2', '-out', `${name}-cert.pem`, '-extfile', `${name}.ext`],
      work,
    );
    void ext;
  };
  ca('ca');
  ca('rogueca');
  execFileSync('sh', ['-c', `printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\n' > server.ext; printf 'extendedKeyUsage=clientAuth\\n' > client.ext; cp client.ext rogue.ext`], { cwd: work });
  leaf('server', 'ca', 'server.ext');
  leaf('client', 'ca', 'client.ext');
  leaf('rogue', 'rogueca', 'rogue.ext');
  const dirs: TlsDirs = { server: join(base, 'tls-server'), client: join(base, 'tls-client'), rogue: join(base, 'tls-rogue'), anonymous: join(base, 'tls-anon') };
  for (const d of Object.values(dirs)) {
    mkdirSync(d, { recursive: true });
    copyFileSync(join(work, 'ca-cert.pem'), join(d, 'ca-cert.pem'));
  }
  copyFileSync(join(work, 'server-cert.pem'), join(dirs.server, 'server-cert.pem'));
  copyFileSync(join(work, 'server-key.pem'), join(dirs.server, 'server-key.pem'));
  copyFileSync(join(work, 'client-cert.pem'), join(dirs.client, 'client-cert.pem'));
  copyFileSync(join(work, 'client-key.pem'), join(dirs.client, 'client-key.pem'));
  copyFileSync(join(work, 'rogue-cert.pem'), join(dirs.rogue, 'client-cert.pem'));
  copyFileSync(join(work, 'rogue-key.pem'), join(dirs.rogue, 'client-key.pem'));
  return dirs;
}
