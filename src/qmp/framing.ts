// QMP socket framing: the byte stream carries JSON values back to back, with or without
// newlines, split anywhere by the transport. The splitter tracks nesting and strings to find
// where each top-level value ends, like QEMU's JSON streamer, and bounds what it keeps: a
// value larger than `maxMessageSize` or nested deeper than `maxDepth` is skipped to its end
// and reported as one error, so the connection carries on with the next value.

import { StringDecoder } from 'node:string_decoder';
import { annotateLiterals, hasSpecialNumbers } from '../util/json-literals.js';

export const DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024;
/** QEMU's json-streamer nesting limit */
export const DEFAULT_MAX_DEPTH = 1024;

export type FrameResult = { ok: true; value: unknown } | { ok: false; error: string };

export class JsonSplitter {
  private readonly decoder = new StringDecoder('utf8');
  private parts: string[] = [];
  private size = 0;
  private depth = 0;
  private inString = false;
  private escape = false;
  /** a top-level scalar (number, keyword, junk) is being collected */
  private inScalar = false;
  private overflow: string | null = null;

  constructor(
    private readonly onFrame: (r: FrameResult) => void,
    private readonly maxMessageSize = DEFAULT_MAX_MESSAGE_SIZE,
    private readonly maxDepth = DEFAULT_MAX_DEPTH,
  ) {}

  feed(chunk: Buffer | string): void {
    if (typeof chunk === 'string') {
      this.feedText(chunk);
      return;
    }
    // Bytes that can never be UTF-8 (0xc0, 0xc1, 0xf5-0xff) are lexical errors: QEMU's
    // lexer reports them and resets, which is how a client resynchronises a connection
    // whose parser state it no longer knows (qmp-spec: "Forcing the JSON parser into
    // known-good state").
    let from = 0;
    for (let i = 0; i < chunk.length; i++) {
      const b = chunk[i]!;
      if (b === 0xc0 || b === 0xc1 || b >= 0xf5) {
        this.feedText(this.decoder.write(chunk.subarray(from, i)));
        this.decoder.end();
        this.lexicalError('\ufffd');
        from = i + 1;
      }
    }
    this.feedText(this.decoder.write(from === 0 ? chunk : chunk.subarray(from)));
  }

  /** QEMU's reset after a lexical error: what was collected is dropped, one error reported. */
  private lexicalError(what: string): void {
    this.parts = [];
    this.size = 0;
    this.depth = 0;
    this.inString = false;
    this.escape = false;
    this.inScalar = false;
    this.overflow = null;
    this.onFrame({ ok: false, error: `JSON parse error, stray '${what}'` });
  }

  private feedText(text: string): void {
    let start = 0; // start of the current message's part within `text`
    const active = () => this.depth > 0 || this.inString || this.inScalar;
    for (let i = 0; i < text.length; i++) {
      const c = text.charCodeAt(i);
      if (c < 0x20 && (this.inString || (c !== 0x0a && c !== 0x0d && c !== 0x09))) {
        // a control character (any, inside a string): a lexical error, as in QEMU's lexer
        this.lexicalError(text[i]!);
        start = i + 1;
        continue;
      }
      if (!active()) {
        // between values
        if (c === 0x20 || c === 0x0a || c === 0x0d || c === 0x09) continue;
        start = i;
        this.parts = [];
        this.size = 0;
        this.overflow = null;
        if (c === 0x7b || c === 0x5b) {
          this.depth = 1;
        } else if (c === 0x22) {
          this.inString = true;
        } else if (c === 0x7d || c === 0x5d) {
          // QEMU's parser: a closing bracket where a value should start
          this.onFrame({ ok: false, error: 'JSON parse error, expecting value' });
        } else {
          this.inScalar = true;
        }
        continue;
      }
      if (this.inString) {
        if (this.escape) this.escape = false;
        else if (c === 0x5c) this.escape = true;
        else if (c === 0x22) {
          this.inString = false;
          if (this.depth === 0) {
            this.finish(text, start, i + 1);
            continue;
          }
        }
        continue;
      }
      if (this.inScalar) {
        if (c === 0x20 || c === 0x0a || c === 0x0d || c === 0x09 || c === 0x7b || c === 0x5b || c === 0x22) {
          this.finish(text, start, i);
          i--; // look at this character again, between values
        }
        continue;
      }
      if (c === 0x22) this.inString = true;
      else if (c === 0x7b || c === 0x5b) {
        this.depth++;
        if (this.depth > this.maxDepth && this.overflow === null) this.overflow = 'JSON parse error, nesting depth limit exceeded';
      } else if (c === 0x7d || c === 0x5d) {
        this.depth--;
        if (this.depth === 0) this.finish(text, start, i + 1);
      }
    }
    if (active()) this.keep(text.slice(start));
  }

  /** Keeps a piece of the current message, unless it already went over the limit. */
  private keep(piece: string): void {
    if (this.overflow !== null) return;
    this.size += piece.length;
    if (this.size > this.maxMessageSize) {
      this.overflow = `JSON parse error, message larger than ${this.maxMessageSize} bytes`;
      this.parts = [];
      return;
    }
    this.parts.push(piece);
  }

  private finish(text: string, start: number, end: number): void {
    this.keep(text.slice(start, end));
    this.depth = 0;
    this.inString = false;
    this.escape = false;
    this.inScalar = false;
    const overflow = this.overflow;
    const whole = this.parts.join('');
    this.parts = [];
    this.size = 0;
    this.overflow = null;
    if (overflow !== null) {
      this.onFrame({ ok: false, error: overflow });
      return;
    }
    this.onFrame(parseJson(whole));
  }
}

/** JSON.parse with QEMU-like messages ("JSON parse error, invalid keyword 'foo'"). */
export function parseJson(text: string): FrameResult {
  try {
    const value = JSON.parse(text) as unknown;
    if (hasSpecialNumbers(text)) annotateLiterals(text, value);
    return { ok: true, value };
  } catch (e) {
    return { ok: false, error: `JSON parse error, ${describeJsonError(text, e)}` };
  }
}

function describeJsonError(text: string, e: unknown): string {
  // Look outside strings for what QEMU's lexer would name first.
  let inString = false;
  let escape = false;
  for (let i = 0; i < text.length; i++) {
    const ch = text[i]!;
    if (inString) {
      if (escape) escape = false;
      else if (ch === '\\') escape = true;
      else if (ch === '"') inString = false;
      continue;
    }
    if (ch === '"') {
      inString = true;
      continue;
    }
    if (/[A-Za-z_]/.test(ch)) {
      const m = /^[A-Za-z_][A-Za-z0-9_]*/.exec(text.slice(i))!;
      if (!['true', 'false', 'null'].includes(m[0])) return `invalid keyword '${m[0]}'`;
      i += m[0].length - 1;
      continue;
    }
    if (!/[\s{}[\],:0-9.+\-eE]/.test(ch)) return `stray '${ch}'`;
  }
  if (inString) return 'missing closing quote';
  const msg = e instanceof Error ? e.message : String(e);
  // V8 echoes the input after a comma: keep only the description.
  return msg.replace(/,? ".*$/s, '').replace(/^Unexpected/, 'unexpected').slice(0, 200);
}

