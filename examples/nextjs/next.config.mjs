/** @type {import('next').NextConfig} */
const nextConfig = {
  // Behind chatkit-gate: no telemetry calls, no powered-by header.
  poweredByHeader: false,
};
export default nextConfig;
