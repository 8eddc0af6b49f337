// `lockstep demo [--size SIZE] [--rounds N] [--keep]`
import { parseArgs } from 'node:util';
import { parseSize } from '../block/options.js';
import { errorMessage } from '../errors.js';
import { runDemo } from '../pair/demo.js';

export async function run(argv: string[]): Promise<number> {
  try {
    const { values } = parseArgs({
      args: argv,
      options: { size: { type: 'string' }, rounds: { type: 'string' }, keep: { type: 'boolean' }, help: { type: 'boolean', short: 'h' } },
    });
    if (values.help) {
      process.stdout.write('Usage: lockstep demo [--size SIZE (64M)] [--rounds N (5)] [--keep]\n');
      return 0;
    }
    const size = parseSize(values.size ?? '64M');
    if (!size || size % 4096 !== 0) throw new Error(`--size: expected a multiple of 4 KiB, got '${values.size}'`);
    const rounds = Number(values.rounds ?? 5);
    if (!Number.isInteger(rounds) || rounds < 1) throw new Error(`--rounds: expected a positive integer`);
    const ok = await runDemo({ size, rounds, keep: values.keep ?? false, out: (l) => process.stdout.write(l + '\n') });
    return ok ? 0 : 1;
  } catch (e) {
    process.stderr.write(`lockstep demo: ${errorMessage(e)}\n`);
    return 1;
  }
}
