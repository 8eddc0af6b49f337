// Logs on stderr, in one of two formats:
//   json  one JSON object per line ({"time", "level", "msg", ...fields}): for files, journald,
//         log shippers; the default when stderr is not a terminal;
//   human short lines for a person at a terminal: "16:52:03.123 INFO  msg  key=value ...";
//         the default when stderr is a terminal.
// Written by hand rather than with pino: a handful of lines, synchronous writes (so that the
// last lines before an exit are never lost) and no dependency.

export type LogLevel = 'debug' | 'info' | 'warn' | 'error' | 'silent';
export type LogFormat = 'json' | 'human';

const RANK: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40, silent: 100 };

export const LOG_LEVELS = Object.keys(RANK) as LogLevel[];
export const LOG_FORMATS: readonly LogFormat[] = ['json', 'human'];

export type LogSink = (line: string) => void;

/** human on a terminal, json otherwise (a pipe, a file, journald) */
export function defaultLogFormat(stream: { isTTY?: boolean } = process.stderr): LogFormat {
  return stream.isTTY ? 'human' : 'json';
}

/** Parses a --log-format value; an error names the option and the choices. */
export function parseLogFormat(value: string, option = '--log-format'): LogFormat {
  if (!(LOG_FORMATS as readonly string[]).includes(value)) throw new Error(`${option}: '${value}' is not one of ${LOG_FORMATS.join(', ')}`);
  return value as LogFormat;
}

const LEVEL_TAG: Record<string, string> = { debug: 'DEBUG', info: 'INFO ', warn: 'WARN ', error: 'ERROR' };
const COLOR: Record<string, string> = { warn: '\x1b[33m', error: '\x1b[31m', debug: '\x1b[2m' };

function fieldText(v: unknown): string {
  if (typeof v === 'string') return /[\s"=]/.test(v) || v === '' ? JSON.stringify(v) : v;
  if (Array.isArray(v) && v.every((x) => typeof x === 'string' || typeof x === 'number')) return v.map((x) => fieldText(x)).join(',');
  if (typeof v === 'bigint') return v.toString();
  return JSON.stringify(v, (_k, x: unknown) => (typeof x === 'bigint' ? x.toString() : x)) ?? String(v);
}

/**
 * One record as a terminal line: local time of day, level, the component (if any) as a
 * prefix, the message, then the other fields as key=value (null and undefined left out).
 */
export function formatHuman(rec: Record<string, unknown>, color = false): string {
  const t = new Date(String(rec.time ?? Date.now()));
  const p2 = (n: number) => String(n).padStart(2, '0');
  const time = Number.isNaN(t.getTime()) ? String(rec.time) : `${p2(t.getHours())}:${p2(t.getMinutes())}:${p2(t.getSeconds())}.${String(t.getMilliseconds()).padStart(3, '0')}`;
  const level = String(rec.level);
  const tag = LEVEL_TAG[level] ?? level.toUpperCase();
  const fields: string[] = [];
  for (const [k, v] of Object.entries(rec)) {
    if (k === 'time' || k === 'level' || k === 'msg' || k === 'component' || v === null || v === undefined) continue;
    fields.push(`${k}=${fieldText(v)}`);
  }
  const prefix = typeof rec.component === 'string' ? `${rec.component}: ` : '';
  const head = color && COLOR[level] ? `${COLOR[level]}${tag}\x1b[0m` : tag;
  return `${time} ${head} ${prefix}${String(rec.msg)}${fields.length ? '  ' + fields.join(' ') : ''}`;
}

function formatJson(rec: Record<string, unknown>): string {
  try {
    return JSON.stringify(rec, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v));
  } catch {
    return JSON.stringify({ time: rec.time, level: rec.level, msg: rec.msg });
  }
}

export interface LoggerOptions {
  format?: LogFormat;
  /** colour the level in human lines (a terminal that wants it) */
  color?: boolean;
}

export class Logger {
  private readonly format: LogFormat;
  private readonly color: boolean;

  constructor(
    private readonly level: LogLevel = 'info',
    private readonly sink: LogSink = (line) => process.stderr.write(line),
    private readonly base: Record<string, unknown> = {},
    options: LoggerOptions = {},
  ) {
    this.format = options.format ?? 'json';
    this.color = options.color ?? false;
  }

  child(fields: Record<string, unknown>): Logger {
    return new Logger(this.level, this.sink, { ...this.base, ...fields }, { format: this.format, color: this.color });
  }

  enabled(level: LogLevel): boolean {
    return RANK[level] >= RANK[this.level];
  }

  private write(level: LogLevel, msg: string, fields?: Record<string, unknown>): void {
    if (!this.enabled(level)) return;
    const rec: Record<string, unknown> = { time: new Date().toISOString(), level, msg, ...this.base, ...fields };
    this.sink((this.format === 'human' ? formatHuman(rec, this.color) : formatJson(rec)) + '\n');
  }

  debug(msg: string, fields?: Record<string, unknown>): void {
    this.write('debug', msg, fields);
  }
  info(msg: string, fields?: Record<string, unknown>): void {
    this.write('info', msg, fields);
  }
  warn(msg: string, fields?: Record<string, unknown>): void {
    this.write('warn', msg, fields);
  }
  error(msg: string, fields?: Record<string, unknown>): void {
    this.write('error', msg, fields);
  }
}
