//! chatkit-gate: a reverse-proxy sidecar that puts TLS, forward authentication, Redis-backed
//! rate limits and OpenAI ChatKit session minting in front of any web app.
//!
//! The modules are layers, listed here bottom to top; each imports only from its own layer and
//! the ones below (`tests/layers.rs` enforces it, `ARCHITECTURE.md` draws it).
#![forbid(unsafe_code)]

// Foundation: settings, HTTP primitives, what operators see.
pub mod config;
pub mod http;
pub mod obs;
// Transport: sockets, TLS, the app behind the gate, outside services.
pub mod transport;
pub mod upstream;
// Request facts and checks, before any policy.
pub mod request;
// Features: rate limits; then authentication, hosted ChatKit sessions, the ChatKit-server route.
pub mod auth;
pub mod chatkit;
pub mod chatkit_server;
pub mod ratelimit;
// One request, phase by phase.
pub mod pipeline;
// Listeners, connections, the admin port.
pub mod server;
// The command line.
pub mod cli;

pub use config::Config;
pub use server::{Listeners, run};
