import { headers } from "next/headers";

// Rendered per request: the identity comes from the gate's headers.
export const dynamic = "force-dynamic";

export default async function Dashboard() {
  const h = await headers();
  return (
    <main>
      <h1>Dashboard</h1>
      <dl>
        <dt>User id</dt>
        <dd id="user-id">{h.get("x-auth-request-user")}</dd>
        <dt>Name</dt>
        <dd id="user-name">{h.get("x-auth-request-name")}</dd>
        <dt>Email</dt>
        <dd id="user-email">{h.get("x-auth-request-email")}</dd>
      </dl>
    </main>
  );
}
