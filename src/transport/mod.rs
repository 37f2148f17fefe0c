//! Sockets and outside services: worker threads, client connection state, server TLS, tunnels,
//! the outbound HTTPS client (introspection, OpenAI) and Redis.

pub mod client_io;
pub mod conn;
pub mod https_client;
pub mod redis;
pub mod tls;
pub mod tunnel;
pub mod workers;
