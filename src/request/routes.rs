//! The route table: first match by path prefix on segment boundaries, on the normalised path
//! ([`crate::http::path::normalize_path`]); the gate's own ChatKit paths match exactly.

use std::sync::Arc;

use crate::config::{Config, RouteAuth, Unauthenticated};

/// The gate's own ChatKit endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Session,
    Refresh,
}

impl Endpoint {
    /// The `endpoint` metric label.
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::Session => "session",
            Endpoint::Refresh => "refresh",
        }
    }
}

/// What a matched route leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    /// Forward to the app.
    Proxy,
    /// Answered by the gate itself.
    ChatKit(Endpoint),
    /// Forward to a self-hosted ChatKit server, after reading and checking the request
    /// (`[routes.chatkit_server]`, see `chatkit_server`).
    ChatKitServer,
}

/// One compiled route.
#[derive(Debug, Clone)]
pub struct Route {
    /// Position in the table (stable; modules index per-route data by it).
    pub index: usize,
    /// The `route` metric label.
    pub name: String,
    pub path: String,
    pub auth: RouteAuth,
    pub unauthenticated: Unauthenticated,
    /// Names of the rate-limit policies applied, in order.
    pub rate_limit: Vec<String>,
    pub kind: RouteKind,
}

/// All routes, own endpoints first, then `[[routes]]` in file order, then the default.
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
    /// How many leading routes are exact-match (the gate's own endpoints).
    exact: usize,
}

impl RouteTable {
    pub fn new(config: &Config) -> RouteTable {
        let mut routes = Vec::new();
        if let Some(ck) = &config.chatkit {
            for (name, path, endpoint) in [
                ("chatkit_session", &ck.session_path, Endpoint::Session),
                ("chatkit_refresh", &ck.refresh_path, Endpoint::Refresh),
            ] {
                routes.push(Route {
                    index: routes.len(),
                    name: name.into(),
                    path: path.clone(),
                    auth: RouteAuth::Required,
                    unauthenticated: Unauthenticated::Json,
                    rate_limit: ck.rate_limit.clone(),
                    kind: RouteKind::ChatKit(endpoint),
                });
            }
        }
        let exact = routes.len();
        for r in &config.routes {
            routes.push(Route {
                index: routes.len(),
                name: r.name.clone(),
                path: r.path.clone(),
                auth: r.auth,
                unauthenticated: r.unauthenticated,
                rate_limit: r.rate_limit.clone(),
                kind: if r.chatkit_server.is_some() { RouteKind::ChatKitServer } else { RouteKind::Proxy },
            });
        }
        routes.push(Route {
            index: routes.len(),
            name: "default".into(),
            path: "/".into(),
            auth: if config.auth.is_some() { RouteAuth::Required } else { RouteAuth::Public },
            unauthenticated: Unauthenticated::Auto,
            rate_limit: Vec::new(),
            kind: RouteKind::Proxy,
        });
        RouteTable { routes: routes.into_iter().map(Arc::new).collect(), exact }
    }

    /// The route for a normalised request path (never fails: the last route is the default).
    pub fn find(&self, path: &str) -> &Arc<Route> {
        let (own, rest) = self.routes.split_at(self.exact);
        if let Some(r) = own.iter().find(|r| r.path == path) {
            return r;
        }
        let last = rest.len() - 1;
        rest[..last].iter().find(|r| crate::http::path::prefix_matches(&r.path, path)).unwrap_or(&rest[last])
    }

    pub fn all(&self) -> &[Arc<Route>] {
        &self.routes
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn first_prefix_match_wins_and_own_paths_are_exact() {
        let config = Config::from_toml(
            r#"
            [server]
            listen = "127.0.0.1:8443"
            [tls]
            self_signed = true
            [upstream]
            url = "http://127.0.0.1:3000"
            [auth]
            introspection_url = "http://127.0.0.1:3000/api/auth/session"
            [[routes]]
            path = "/login"
            auth = "public"
            [[routes]]
            path = "/api/"
            name = "api"
            [[routes]]
            path = "/api/public/"
            auth = "public"
            [chatkit]
            workflow_id = "wf_1"
            "#,
        )
        .unwrap();
        let t = RouteTable::new(&config);
        assert_eq!(t.find("/login").name, "/login");
        assert_eq!(t.find("/login/next").name, "/login");
        assert_eq!(t.find("/loginx").name, "default");
        assert_eq!(t.find("/login-admin").name, "default");
        assert_eq!(t.find("/api/public/x").name, "api");
        assert_eq!(t.find("/api/chatkit/session").kind, RouteKind::ChatKit(Endpoint::Session));
        assert_eq!(t.find("/api/chatkit/session/x").name, "api");
        let d = t.find("/other");
        assert_eq!((d.name.as_str(), d.auth), ("default", RouteAuth::Required));
    }
}
