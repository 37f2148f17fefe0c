pub mod certs;
pub mod fake_openai;
pub mod redis;
