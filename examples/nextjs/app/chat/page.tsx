import Chat from "./chat";

export const dynamic = "force-dynamic";

export default function ChatPage() {
  return (
    <main>
      <h1>Chat</h1>
      <Chat />
    </main>
  );
}
