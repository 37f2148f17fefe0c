pub mod certs;
pub mod fake_openai;
pub mod gate;
pub mod introspection;
pub mod redis;
pub mod upstream;
