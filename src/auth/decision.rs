//! What authentication decides: a signed-in identity with its headers, or signed out; what one
//! introspection call produced for every request that waited on it; and the `result` and
//! `source` labels of `chatkit_gate_auth_decisions_total`.

use std::sync::Arc;

use http::{HeaderName, HeaderValue};

use crate::auth::introspect::Failure;
use crate::request::context::Identity;

/// A signed-in decision: the identity and its identity headers, built once per answer.
#[derive(Debug)]
pub(crate) struct Signed {
    pub(crate) identity: Arc<Identity>,
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
}

/// What is cached per credentials.
#[derive(Debug, Clone)]
pub(crate) enum Decision {
    SignedIn(Arc<Signed>),
    SignedOut,
}

/// What one introspection call produced, shared by every request that waited for it.
#[derive(Debug, Clone)]
pub(crate) enum CallResult {
    /// The decision and the answer's `Set-Cookie` values (given to the requests that shared
    /// this call, never replayed from the cache).
    Decided(Decision, Arc<[HeaderValue]>),
    Failed(Failure),
}

/// Where a decision came from: the `source` label of `chatkit_gate_auth_decisions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DecisionSource {
    Introspection,
    Cache,
    Stale,
    /// No credentials at all: signed out without asking anyone.
    None,
}

impl DecisionSource {
    pub(crate) const ALL: [DecisionSource; 4] =
        [DecisionSource::Introspection, DecisionSource::Cache, DecisionSource::Stale, DecisionSource::None];

    pub(crate) fn label(self) -> &'static str {
        match self {
            DecisionSource::Introspection => "introspection",
            DecisionSource::Cache => "cache",
            DecisionSource::Stale => "stale",
            DecisionSource::None => "none",
        }
    }
}

/// The `result` label of `chatkit_gate_auth_decisions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DecisionResult {
    Allow,
    Deny,
    Error,
}

impl DecisionResult {
    pub(crate) const ALL: [DecisionResult; 3] = [DecisionResult::Allow, DecisionResult::Deny, DecisionResult::Error];

    pub(crate) fn label(self) -> &'static str {
        match self {
            DecisionResult::Allow => "allow",
            DecisionResult::Deny => "deny",
            DecisionResult::Error => "error",
        }
    }
}
