// next-auth 4 options: one Credentials user, JWT sessions (the default).
import type { NextAuthOptions } from "next-auth";
import CredentialsProvider from "next-auth/providers/credentials";

const USERS: Record<string, { id: string; name: string; email: string; password: string }> = {
  alice: { id: "u-alice", name: "Alice Liddell", email: "alice@example.com", password: "wonderland" },
};

export const authOptions: NextAuthOptions = {
  providers: [
    CredentialsProvider({
      name: "password",
      credentials: {
        username: { label: "Username", type: "text" },
        password: { label: "Password", type: "password" },
      },
      async authorize(credentials) {
        const user = credentials && USERS[credentials.username];
        if (!user || user.password !== credentials.password) return null;
        return { id: user.id, name: user.name, email: user.email };
      },
    }),
  ],
  // --8<-- [start:session-callback]
  callbacks: {
    // The gate reads the user id at /user/id: NextAuth leaves it out unless you add it.
    async session({ session, token }) {
      if (session.user && token.sub) (session.user as { id?: string }).id = token.sub;
      return session;
    },
  },
  // --8<-- [end:session-callback]
};
