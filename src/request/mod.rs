//! Facts about one request and the checks made before any policy: its route, its context and
//! identity, and header and path hygiene.

pub mod context;
pub mod hygiene;
pub mod routes;
