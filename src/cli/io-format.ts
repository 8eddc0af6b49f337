// Output formats shared by `lockstep io` and `lockstep img`: the size, time and hex-dump
// spellings qemu-io and qemu-img print, so that scripts parsing their output keep working.

const UNITS: ReadonlyArray<readonly [number, string]> = [
  [2 ** 60, 'EiB'],
  [2 ** 50, 'PiB'],
  [2 ** 40, 'TiB'],
  [2 ** 30, 'GiB'],
  [2 ** 20, 'MiB'],
  [2 ** 10, 'KiB'],
];

/**
 * qemu-io's human size: "4 KiB", "1.125 MiB", "512 bytes", "65.521087 bytes" (three
 * decimals for units, six for bytes, and a ".000..." tail dropped up to the unit).
 */
export function humanSize(value: number): string {
  let text: string;
  let suffix = ' bytes';
  const unit = UNITS.find(([u]) => value >= u);
  if (unit) {
    text = (value / unit[0]).toFixed(3);
    suffix = ` ${unit[1]}`;
  } else {
    text = Number.isFinite(value) ? value.toFixed(6) : String(value);
  }
  const cut = text.indexOf('.000');
  return (cut >= 0 ? text.slice(0, cut) : text) + suffix;
}

/** Elapsed time as qemu-io prints it: "00.01 sec" below a second, "0:00:01.50" above. */
export function elapsedText(seconds: number, fixed = false): string {
  // whole microseconds first, as qemu-io works on a struct timeval
  const usec = Math.round(seconds * 1e6);
  const whole = Math.floor(usec / 1e6);
  const hundredths = Math.floor((usec % 1e6) / 1e4);
  const hh = String(hundredths).padStart(2, '0');
  if (fixed || whole > 0) {
    const h = Math.floor(whole / 3600);
    const m = Math.floor((whole % 3600) / 60);
    const s = whole % 60;
    return `${h}:${String(m).padStart(2, '0')}:${String(s).padStart(2, '0')}.${hh}`;
  }
  return `${String(whole).padStart(2, '0')}.${hh} sec`;
}

/**
 * The two lines after a qemu-io read/write/discard ("read 4096/4096 bytes at offset 0",
 * "4 KiB, 1 ops; 00.00 sec (...)"), or the -C line ("4096,1,0:00:00.00,2727.439,0.666").
 */
export function ioReport(op: string, seconds: number, offset: number, count: number, total: number, ops: number, machine: boolean): string {
  const ts = elapsedText(seconds, machine);
  const rate = total / seconds;
  const opsRate = ops / seconds;
  if (machine) return `${total},${ops},${ts},${rate.toFixed(3)},${opsRate.toFixed(3)}\n`;
  return (
    `${op} ${total}/${count} bytes at offset ${offset}\n` +
    `${humanSize(total)}, ${ops} ops; ${ts} (${humanSize(rate)}/sec and ${opsRate.toFixed(4)} ops/sec)\n`
  );
}

/** qemu-io's `read -v` dump: 16 bytes a line, hex then alphanumerics (others as '.'). */
export function hexDump(buf: Buffer, offset: number): string {
  let out = '';
  for (let i = 0; i < buf.length; i += 16) {
    const line = buf.subarray(i, Math.min(i + 16, buf.length));
    let hex = '';
    let text = '';
    for (const b of line) {
      hex += b.toString(16).padStart(2, '0') + ' ';
      const isAlnum = (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5a) || (b >= 0x61 && b <= 0x7a);
      text += isAlnum ? String.fromCharCode(b) : '.';
    }
    out += `${(offset + i).toString(16).padStart(8, '0')}:  ${hex} ${text}\n`;
  }
  return out;
}
