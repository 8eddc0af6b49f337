// Optional native helper (fcntl OFD locks, SEEK_DATA/SEEK_HOLE, fallocate). lockstep works
// without it; when it is built, the file driver uses it for QEMU-compatible locking and
// sparse-file block status.

export interface NativeHelper {
  /** takes QEMU's image locks on fd; throws InvalidArgumentError on conflict */
  lockImage(fd: number, readOnly: boolean, filename: string): void;
}

export function loadNative(): NativeHelper | null {
  return null;
}
