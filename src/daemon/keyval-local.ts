// Interim keyval parser until src/util/keyval.ts (io branch) lands: `a=1,b.c=2` with `,,`
// escaping a comma, an optional implied first key, dotted keys nested, and JSON when the
// text starts with '{' or 'json:'.

import { InvalidArgumentError } from '../errors.js';
import { nestDotted } from '../qmp/schema/types.js';

export function parseKeyval(text: string, implied?: string): Record<string, unknown> {
  const t = text.trim();
  if (t.startsWith('{') || t.startsWith('json:')) {
    const json = t.startsWith('json:') ? t.slice(5) : t;
    let v: unknown;
    try {
      v = JSON.parse(json);
    } catch (e) {
      throw new InvalidArgumentError(`Invalid JSON: ${(e as Error).message}`);
    }
    if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new InvalidArgumentError('JSON options must be an object');
    return v as Record<string, unknown>;
  }
  const pairs: Array<[string, string]> = [];
  let i = 0;
  let first = true;
  while (i < text.length) {
    // key (up to '=' or ',')
    let j = i;
    while (j < text.length && text[j] !== '=' && text[j] !== ',') j++;
    const key = text.slice(i, j);
    if (j >= text.length || text[j] === ',') {
      if (first && implied !== undefined) {
        // implied key: the whole piece up to an unescaped comma is its value
        const { value, next } = readValue(text, i);
        pairs.push([implied, value]);
        i = next;
        first = false;
        continue;
      }
      throw new InvalidArgumentError(`Expected '=' after parameter '${key}'`);
    }
    if (key === '') throw new InvalidArgumentError(`Invalid parameter ''`);
    const { value, next } = readValue(text, j + 1);
    pairs.push([key, value]);
    i = next;
    first = false;
  }
  return nestDotted(pairs);
}

function readValue(text: string, start: number): { value: string; next: number } {
  let out = '';
  let i = start;
  while (i < text.length) {
    if (text[i] === ',') {
      if (text[i + 1] === ',') {
        out += ',';
        i += 2;
        continue;
      }
      return { value: out, next: i + 1 };
    }
    out += text[i];
    i++;
  }
  return { value: out, next: i };
}
