//! What operators see: Prometheus metrics, the JSON log writer, the audit log, time formatting.

pub mod audit;
pub mod logwriter;
pub mod metrics;
pub mod time;
