// Preloaded (node --import) into lockstep processes the hostile suite runs: on exit the
// process writes its own peak RSS in bytes (getrusage's maxrss) to fd 3, when fd 3 is open.
import { writeSync } from 'node:fs';

process.on('exit', () => {
  try {
    writeSync(3, String(process.resourceUsage().maxRSS * 1024));
  } catch {
    // fd 3 not given: nothing to report to
  }
});
