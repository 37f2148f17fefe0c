// How often the gate asked NextAuth who is signed in (GET /api/auth/session). Example-only:
// the browser walk reads it (at /api/example-stats, on the app's own port) to show the gate's
// decision cache at work.
const counter = globalThis as unknown as { sessionCalls?: number };

export function countSessionCall() {
  counter.sessionCalls = (counter.sessionCalls ?? 0) + 1;
}

export function sessionCalls(): number {
  return counter.sessionCalls ?? 0;
}
