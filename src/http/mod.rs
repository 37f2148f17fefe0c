//! HTTP primitives with no policy in them: bodies, the lean HTTP/1.1 client codec, header names
//! and hop-by-hop rules, forwarded headers, path normalisation and request errors.

pub mod body;
pub mod error;
pub mod forwarded;
pub mod h1;
pub mod headers;
pub mod path;
pub mod upload;
