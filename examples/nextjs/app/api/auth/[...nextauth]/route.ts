import NextAuth from "next-auth";
import { authOptions } from "../../../auth";
import { countSessionCall } from "../../../stats";

const handler = NextAuth(authOptions);

// GET /api/auth/session is what the gate calls: counted, so the walk can show the cache works.
async function GET(req: Request, ctx: { params: Promise<{ nextauth: string[] }> }) {
  if (new URL(req.url).pathname === "/api/auth/session") countSessionCall();
  return handler(req, ctx);
}

export { GET, handler as POST };
