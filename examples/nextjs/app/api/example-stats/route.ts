import { sessionCalls } from "../../stats";

export const dynamic = "force-dynamic";

export async function GET() {
  return Response.json({ sessionCalls: sessionCalls() });
}
