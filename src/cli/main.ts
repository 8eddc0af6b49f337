// `lockstep <subcommand>`: wiring only. Each subcommand lives in its own module and exports
// `run(argv): Promise<number>` (the exit code).

const SUBCOMMANDS: Record<string, { module: string; summary: string }> = {
  img: { module: './img.js', summary: 'create, inspect, check, convert and compare images (qemu-img subset)' },
  io: { module: './io.js', summary: 'run I/O commands against an image (qemu-io subset)' },
  daemon: { module: './daemon.js', summary: 'serve block nodes over NBD with a QMP monitor (qemu-storage-daemon)' },
  qmp: { module: './qmp.js', summary: 'send QMP commands to a daemon' },
  pair: { module: './pair.js', summary: 'run and supervise a primary/secondary replication pair' },
  demo: { module: './demo.js', summary: 'a scripted pair run: load, checkpoints, primary killed, failover, verification' },
};

function usage(): string {
  const lines = ['Usage: lockstep <command> [options]', '', 'Commands:'];
  for (const [name, s] of Object.entries(SUBCOMMANDS)) lines.push(`  ${name.padEnd(8)} ${s.summary}`);
  lines.push('', "Run 'lockstep <command> --help' for a command's options.");
  return lines.join('\n') + '\n';
}

export async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  if (!cmd || cmd === '--help' || cmd === '-h' || cmd === 'help') {
    process.stdout.write(usage());
    return cmd ? 0 : 1;
  }
  if (cmd === '--version' || cmd === '-V') {
    process.stdout.write('lockstep 0.1.0\n');
    return 0;
  }
  const sub = SUBCOMMANDS[cmd];
  if (!sub) {
    process.stderr.write(`lockstep: unknown command '${cmd}'\n${usage()}`);
    return 1;
  }
  let mod: { run(argv: string[]): Promise<number> };
  try {
    mod = (await import(sub.module)) as typeof mod;
  } catch (e) {
    if ((e as { code?: string }).code === 'ERR_MODULE_NOT_FOUND') {
      process.stderr.write(`lockstep: '${cmd}' is not available in this build\n`);
      return 1;
    }
    throw e;
  }
  return mod.run(rest);
}
