// Which unexpected member QEMU 7.2 names first. Its input visitor puts a dictionary's keys
// into a GLib hash table (in the order of QEMU's own QDict buckets), removes each member as it
// visits it, and then reports the first key the table iterates: so with two strangers, the
// one QEMU names depends on GLib's hashing, not on the JSON order. This module replays both
// tables (QDict: 512 buckets, tdb hash, newest first per bucket; GHashTable: g_str_hash,
// (hash * 11) % prime, quadratic probing, in-place resizes) to name the same key.

const QDICT_BUCKETS = 512;
/** GLib's prime_mod[] by table shift */
const PRIME_MOD = [1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521];
const MIN_SHIFT = 3;

function utf8(s: string): Buffer {
  return Buffer.from(s, 'utf8');
}

/** QEMU's tdb_hash (qobject/qdict.c), modulo the bucket count. */
function qdictBucket(key: string): number {
  const b = utf8(key);
  let value = Math.imul(0x238f13af, b.length) >>> 0;
  for (let i = 0; i < b.length; i++) value = (value + ((b[i]! << ((i * 5) % 24)) >>> 0)) >>> 0;
  return ((Math.imul(1103515243, value) + 12345) >>> 0) % QDICT_BUCKETS;
}

/** The order qdict_first/qdict_next visit the keys of a dictionary built in `keys` order. */
export function qdictOrder(keys: readonly string[]): string[] {
  const buckets = new Map<number, string[]>();
  for (const k of keys) {
    const h = qdictBucket(k);
    const list = buckets.get(h) ?? [];
    list.unshift(k); // QLIST_INSERT_HEAD
    buckets.set(h, list);
  }
  return [...buckets.entries()].sort((a, b) => a[0] - b[0]).flatMap(([, l]) => l);
}

/** GLib's g_str_hash (djb2 over signed chars). */
function strHash(key: string): number {
  const b = utf8(key);
  let h = 5381;
  for (let i = 0; i < b.length; i++) {
    const c = b[i]! >= 128 ? b[i]! - 256 : b[i]!;
    h = (Math.imul(h, 33) + c) >>> 0;
  }
  return h;
}

const UNUSED = 0;
const TOMBSTONE = 1;

/** A GLib GHashTable of string keys, as far as iteration order goes. */
class GHashTableModel {
  private shift = MIN_SHIFT;
  private size = 1 << MIN_SHIFT;
  private mod = PRIME_MOD[MIN_SHIFT]!;
  private mask = (1 << MIN_SHIFT) - 1;
  private hashes: number[] = new Array<number>(this.size).fill(UNUSED);
  private keys: Array<string | null> = new Array<string | null>(this.size).fill(null);
  private nnodes = 0;
  private noccupied = 0;

  private toIndex(hash: number): number {
    return Number((BigInt(hash) * 11n) & 0xffffffffn) % this.mod;
  }

  private static real(hash: number): number {
    return hash < 2 ? 2 : hash;
  }

  /** g_hash_table_lookup_node: the key's slot, or the slot an insert would use */
  private lookup(key: string, hash: number): { index: number; found: boolean } {
    let index = this.toIndex(hash);
    let tombstone = -1;
    let step = 0;
    while (this.hashes[index] !== UNUSED) {
      if (this.hashes[index] === hash && this.keys[index] === key) return { index, found: true };
      if (this.hashes[index] === TOMBSTONE && tombstone < 0) tombstone = index;
      step++;
      index = (index + step) & this.mask;
    }
    return { index: tombstone >= 0 ? tombstone : index, found: false };
  }

  insert(key: string): void {
    const hash = GHashTableModel.real(strHash(key));
    const { index, found } = this.lookup(key, hash);
    if (found) return;
    const wasTombstone = this.hashes[index] === TOMBSTONE;
    this.hashes[index] = hash;
    this.keys[index] = key;
    this.nnodes++;
    if (!wasTombstone) {
      this.noccupied++;
      this.maybeResize();
    }
  }

  remove(key: string): void {
    const hash = GHashTableModel.real(strHash(key));
    const { index, found } = this.lookup(key, hash);
    if (!found) return;
    this.hashes[index] = TOMBSTONE;
    this.keys[index] = null;
    this.nnodes--;
    this.maybeResize();
  }

  private maybeResize(): void {
    const size = this.size;
    if ((size > this.nnodes * 4 && size > 1 << MIN_SHIFT) || size <= this.noccupied + Math.floor(this.noccupied / 16)) this.resize();
  }

  private resize(): void {
    const oldSize = this.size;
    let n = Math.floor(this.nnodes * 1.333);
    let shift = 0;
    for (; n; shift++) n >>= 1;
    this.shift = Math.max(shift, MIN_SHIFT);
    this.size = 1 << this.shift;
    this.mod = PRIME_MOD[this.shift]!;
    this.mask = this.size - 1;
    if (this.size > oldSize) {
      for (let i = oldSize; i < this.size; i++) {
        this.hashes[i] = UNUSED;
        this.keys[i] = null;
      }
    }
    const relocated = new Array<boolean>(Math.max(this.size, oldSize)).fill(false);
    // GLib's in-place rehash: walk the old slots, move each entry to its new home, evicting
    // whatever lived there and placing it next
    for (let i = 0; i < oldSize; i++) {
      let nodeHash = this.hashes[i]!;
      if (nodeHash < 2) {
        this.hashes[i] = UNUSED;
        continue;
      }
      if (relocated[i]) continue;
      this.hashes[i] = UNUSED;
      let key = this.keys[i]!;
      this.keys[i] = null;
      for (;;) {
        let index = this.toIndex(nodeHash);
        let step = 0;
        while (relocated[index]) {
          step++;
          index = (index + step) & this.mask;
        }
        relocated[index] = true;
        const replacedHash = this.hashes[index]!;
        const replacedKey = this.keys[index]!;
        this.hashes[index] = nodeHash;
        this.keys[index] = key;
        if (replacedHash < 2) break;
        nodeHash = replacedHash;
        key = replacedKey;
      }
    }
    this.hashes.length = this.size;
    this.keys.length = this.size;
    this.noccupied = this.nnodes;
  }

  first(): string | undefined {
    for (let i = 0; i < this.size; i++) if (this.hashes[i]! >= 2) return this.keys[i]!;
    return undefined;
  }
}

/**
 * The key QEMU reports as unexpected in a dictionary whose keys are `keys` (in JSON order)
 * after visiting the members `visited` (in visiting order); undefined when none is left.
 */
export function firstUnexpected(keys: readonly string[], visited: readonly string[]): string | undefined {
  const present = new Set(keys);
  const table = new GHashTableModel();
  for (const k of qdictOrder(keys)) table.insert(k);
  for (const v of visited) if (present.has(v)) table.remove(v);
  return table.first();
}
