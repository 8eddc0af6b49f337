#!/usr/bin/env node
// Structure figures of src/ (issue 19): files over 400 lines, functions over 80 lines, `as`
// casts, `any`. Counted with the TypeScript compiler's parser (not regexes), so comments and
// strings never count. Usage: node scripts/structure-figures.mjs [DIR] [--list]
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';
import ts from 'typescript';

const args = process.argv.slice(2);
const list = args.includes('--list');
const root = args.find((a) => !a.startsWith('--')) ?? 'src';

function files(dir) {
  const out = [];
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) out.push(...files(p));
    else if (name.endsWith('.ts') && !name.endsWith('.d.ts')) out.push(p);
  }
  return out.sort();
}

const bigFiles = [];
const bigFunctions = [];
let asCasts = 0;
let asUnknownAs = 0;
let anys = 0;
for (const file of files(root)) {
  const text = readFileSync(file, 'utf8');
  const lines = text.split('\n').length - (text.endsWith('\n') ? 1 : 0);
  if (lines > 400) bigFiles.push([relative('.', file), lines]);
  const sf = ts.createSourceFile(file, text, ts.ScriptTarget.Latest, true);
  const lineOf = (pos) => sf.getLineAndCharacterOfPosition(pos).line;
  const visit = (node) => {
    if (ts.isAsExpression(node)) {
      // `as const` asks for literal types: no cast of a value's type
      const isConst = ts.isTypeReferenceNode(node.type) && node.type.typeName.getText(sf) === 'const';
      if (!isConst) {
        asCasts++;
        if (ts.isAsExpression(node.expression) && node.expression.type.kind === ts.SyntaxKind.UnknownKeyword) asUnknownAs++;
      }
    }
    if (node.kind === ts.SyntaxKind.AnyKeyword) anys++;
    if (ts.isFunctionLike(node) && 'body' in node && node.body) {
      const n = lineOf(node.body.getEnd()) - lineOf(node.getStart(sf)) + 1;
      if (n > 80) {
        const name = node.name ? node.name.getText(sf) : ts.isArrowFunction(node) || ts.isFunctionExpression(node) ? '(anonymous)' : '?';
        bigFunctions.push([`${relative('.', file)}:${lineOf(node.getStart(sf)) + 1} ${name}`, n]);
      }
    }
    ts.forEachChild(node, visit);
  };
  visit(sf);
}

console.log(`files over 400 lines: ${bigFiles.length}`);
if (list) for (const [f, n] of bigFiles.sort((a, b) => b[1] - a[1])) console.log(`  ${n} ${f}`);
console.log(`functions over 80 lines: ${bigFunctions.length}`);
if (list) for (const [f, n] of bigFunctions.sort((a, b) => b[1] - a[1])) console.log(`  ${n} ${f}`);
console.log(`'as' casts: ${asCasts} (of them 'as unknown as': ${asUnknownAs})`);
console.log(`'any': ${anys}`);
