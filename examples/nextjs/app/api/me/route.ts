// --8<-- [start:identity]
// The identity the gate verified, from its headers (client copies are always stripped).
import { headers } from "next/headers";

export async function GET() {
  const h = await headers();
  return Response.json({
    id: h.get("x-auth-request-user"),
    name: h.get("x-auth-request-name"),
    email: h.get("x-auth-request-email"),
  });
}
// --8<-- [end:identity]
