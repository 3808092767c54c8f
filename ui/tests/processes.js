// Helpers for tests that run the `neuroshard` binary as child processes.
import { spawn } from "node:child_process";

/** Resolves with the first match of `pattern` in the child's stderr, in whole lines only (a
 * line may arrive in pieces, and a pattern must not match half an address). */
export function awaitLine(child, pattern) {
  return new Promise((resolve, reject) => {
    let seen = "";
    child.stderr.on("data", (chunk) => {
      seen += chunk;
      const m = seen.slice(0, seen.lastIndexOf("\n") + 1).match(pattern);
      if (m) resolve(m);
    });
    child.on("exit", (code) => reject(new Error(`exited ${code} before ${pattern}: ${seen}`)));
  });
}

/** Starts `neuroshard tracker` on a free loopback port; resolves with the child and its URL. */
export async function startTracker(bin) {
  const child = spawn(bin, ["tracker", "--listen", "127.0.0.1:0"], { stdio: ["ignore", "ignore", "pipe"] });
  const [, addr] = await awaitLine(child, /tracker listening on ([0-9.:]+)/);
  return { child, url: `http://${addr}` };
}
