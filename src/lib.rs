//! chatkit-gate: a reverse-proxy sidecar that puts TLS, forward authentication, Redis-backed
//! rate limits and OpenAI ChatKit session minting in front of any web app.
#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod auth;
pub mod body;
pub mod chatkit;
pub mod chatkit_server;
pub mod cli;
pub mod client;
pub mod client_io;
pub mod config;
pub mod context;
pub mod error;
pub mod h1;
pub mod https;
pub mod hygiene;
pub mod logwriter;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod ratelimit;
pub mod routes;
pub mod server;
pub mod store;
pub mod tls;
pub mod tunnel;
pub mod upstream;

pub use config::Config;
pub use server::{Listeners, run};
