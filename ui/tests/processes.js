// Helpers for tests that run the `neuroshard` binary as child processes.

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
