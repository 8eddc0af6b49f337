// Number literals QEMU's JSON parser types differently from JavaScript (QMP framing records
// them; QAPI-style checks in qmp/schema and block/options read them).
//
// QEMU's JSON parser makes an integer literal an int64, else (no minus sign) a uint64, else
// a double, and a literal with a fraction or exponent a double; its QAPI visitors then refuse
// a double where an integer is expected, and a uint64 beyond INT64_MAX for 'int'. JSON.parse
// gives numbers only, so the literals that are not plain int64 are recorded on the object or
// array holding them, under a symbol (invisible to JSON, Object.keys and handlers).

export type LiteralKind = 'double' | 'uint64';
const LITERALS = Symbol('qmp-number-literals');
const INT64_MIN = -(2n ** 63n);
const INT64_MAX = 2n ** 63n - 1n;
const UINT64_MAX = 2n ** 64n - 1n;

/** How QEMU would have typed the number literal at `container[key]` (undefined: int64). */
export function literalKind(container: unknown, key: string | number): LiteralKind | undefined {
  if (container === null || typeof container !== 'object') return undefined;
  const m = (container as { [LITERALS]?: Map<string, LiteralKind> })[LITERALS];
  return m?.get(String(key));
}

function classify(token: string): LiteralKind | undefined {
  if (/[.eE]/.test(token)) return 'double';
  const v = BigInt(token);
  if (v >= INT64_MIN && v <= INT64_MAX) return undefined;
  if (v > 0n && v <= UINT64_MAX) return 'uint64';
  return 'double';
}

/** true when the text has a number literal that is not a plain int64 (outside strings). */
export function hasSpecialNumbers(text: string): boolean {
  const re = /"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?/g;
  for (let m = re.exec(text); m; m = re.exec(text)) {
    if (m[0][0] !== '"' && classify(m[0]) !== undefined) return true;
  }
  return false;
}

/** Records the kinds of the number literals in `text` on the parsed `value`'s containers. */
export function annotateLiterals(text: string, value: unknown): void {
  let i = 0;
  const ws = (): void => {
    while (i < text.length && /\s/.test(text[i]!)) i++;
  };
  const str = (): string => {
    const m = /^"(?:[^"\\]|\\.)*"/.exec(text.slice(i))!;
    i += m[0].length;
    return JSON.parse(m[0]) as string;
  };
  const mark = (container: object, key: string, kind: LiteralKind): void => {
    const c = container as { [LITERALS]?: Map<string, LiteralKind> };
    if (!c[LITERALS]) Object.defineProperty(c, LITERALS, { value: new Map<string, LiteralKind>(), enumerable: false });
    c[LITERALS]!.set(key, kind);
  };
  // walks the text alongside the value JSON.parse built from it (same structure)
  const walk = (v: unknown, container: object | null, key: string): void => {
    ws();
    const c = text[i];
    if (c === '{') {
      i++;
      ws();
      if (text[i] === '}') {
        i++;
        return;
      }
      for (;;) {
        ws();
        const k = str();
        ws();
        i++; // ':'
        walk((v as Record<string, unknown>)[k], v as object, k);
        ws();
        if (text[i++] === '}') return;
      }
    }
    if (c === '[') {
      i++;
      ws();
      if (text[i] === ']') {
        i++;
        return;
      }
      for (let n = 0; ; n++) {
        walk((v as unknown[])[n], v as object, String(n));
        ws();
        if (text[i++] === ']') return;
      }
    }
    if (c === '"') {
      str();
      return;
    }
    const m = /^-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|^[a-z]+/.exec(text.slice(i, i + 400))!;
    i += m[0].length;
    const kind = /^[a-z]/.test(m[0]) ? undefined : classify(m[0]);
    // with duplicate keys JSON.parse keeps the last; a literal it dropped marks nothing
    if (kind && container && (container as Record<string, unknown>)[key] === v) mark(container, key, kind);
  };
  walk(value, null, '');
}
