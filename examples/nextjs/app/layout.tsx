export const metadata = { title: "chatkit-gate + Next.js" };

export default function RootLayout({ children }: { children: React.ReactNode }) {
  return (
    <html lang="en">
      <body style={{ fontFamily: "system-ui, sans-serif", margin: "2rem" }}>
        <nav>
          <a href="/">Home</a> · <a href="/dashboard">Dashboard</a> · <a href="/chat">Chat</a> ·{" "}
          <a href="/api/auth/signout">Sign out</a>
        </nav>
        {children}
      </body>
    </html>
  );
}
