"use client";
// What ChatKit's getClientSecret does: mint a session through the gate, refresh it with the
// current secret. The gate holds the OpenAI key; the browser only ever sees client secrets.
import { useEffect, useState } from "react";

async function post(path: string, body: unknown): Promise<{ client_secret: string; expires_at: number }> {
  const r = await fetch(path, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  if (!r.ok) throw new Error(`${path}: ${r.status} ${await r.text()}`);
  return r.json();
}

export default function Chat() {
  const [minted, setMinted] = useState<string | null>(null);
  const [refreshed, setRefreshed] = useState<string | null>(null);
  const [error, setError] = useState<string | null>(null);

  useEffect(() => {
    (async () => {
      const first = await post("/api/chatkit/session", {});
      setMinted(first.client_secret);
      const second = await post("/api/chatkit/refresh", { currentClientSecret: first.client_secret });
      setRefreshed(second.client_secret);
    })().catch((e: Error) => setError(e.message));
  }, []);

  return (
    <dl>
      <dt>Minted</dt>
      <dd id="minted">{minted ?? "…"}</dd>
      <dt>Refreshed</dt>
      <dd id="refreshed">{refreshed ?? "…"}</dd>
      {error && <dd id="error">{error}</dd>}
    </dl>
  );
}
