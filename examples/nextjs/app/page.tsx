export default function Home() {
  return (
    <main>
      <h1>chatkit-gate + Next.js</h1>
      <p>
        Every page but this one needs a signed-in user: the gate sends you to NextAuth&apos;s sign-in page
        and back. Sign in as <code>alice</code> / <code>wonderland</code>.
      </p>
    </main>
  );
}
