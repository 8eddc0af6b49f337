// The nested option dictionary (QEMU's QDict) that keyval parsing builds and the block layer
// reads (block/options.ts): here, below both, so that neither imports the other for it.

export type OptionDict = Record<string, unknown>;

export function isDict(v: unknown): v is OptionDict {
  return typeof v === 'object' && v !== null && !Array.isArray(v) && !Buffer.isBuffer(v);
}
