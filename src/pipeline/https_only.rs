//! HTTPS enforcement on the plain listener (308 for safe methods, 403 otherwise) and the HSTS
//! header on HTTPS answers.

use http::header::{CONTENT_LENGTH, HOST, LOCATION, STRICT_TRANSPORT_SECURITY};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, Uri};

use crate::config::ServerSettings;
use crate::http::body::GateBody;
use crate::http::error::GateError;

/// The answer to a request that arrived over plain HTTP and is not vouched for by a trusted
/// proxy: a redirect to the HTTPS URL for GET/HEAD, `403 {"error":"HTTPS required"}` otherwise
/// (its body and cookies already crossed the network in clear; replaying it would hide that).
pub fn plain_http_answer(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    server: &ServerSettings,
) -> Response<GateBody> {
    if method != Method::GET && method != Method::HEAD {
        return GateError::HttpsRequired.to_response();
    }
    let Some(host) = redirect_host(uri, headers, &server.hosts) else {
        return GateError::BadRequest("Host header required").to_response();
    };
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let location = if server.https_port == 443 {
        format!("https://{host}{path}")
    } else {
        format!("https://{host}:{}{path}", server.https_port)
    };
    let Ok(location) = HeaderValue::from_str(&location) else {
        return GateError::BadRequest("Invalid request").to_response();
    };
    let mut resp = Response::new(GateBody::empty());
    *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
    resp.headers_mut().insert(LOCATION, location);
    resp.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
    resp
}

/// The host to redirect to: the request's own when allowed, else the first configured host.
/// Never an unlisted host when `hosts` is set (no open redirect through a forged Host).
fn redirect_host<'a>(uri: &'a Uri, headers: &'a HeaderMap, hosts: &'a [String]) -> Option<String> {
    let raw = headers.get(HOST).and_then(|h| h.to_str().ok()).or_else(|| uri.authority().map(|a| a.as_str()));
    let asked = raw.and_then(|r| r.parse::<http::uri::Authority>().ok()).map(|a| a.host().to_ascii_lowercase());
    match (asked, hosts.first()) {
        (Some(h), _) if hosts.is_empty() || hosts.contains(&h) => Some(h),
        (_, Some(first)) => Some(first.clone()),
        (None, None) => None,
        (Some(_), None) => None,
    }
}

/// Add the configured HSTS header unless the app set its own.
pub fn add_hsts(headers: &mut HeaderMap, hsts: Option<&HeaderValue>) {
    if let Some(v) = hsts
        && !headers.contains_key(STRICT_TRANSPORT_SECURITY)
    {
        headers.insert(STRICT_TRANSPORT_SECURITY, v.clone());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::config::Config;

    fn server(hosts: &str, port: u16) -> ServerSettings {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:8443\"\nhttps_port = {port}\nhosts = [{hosts}]\n[tls]\nself_signed = true\n[upstream]\nurl = \"http://127.0.0.1:3000\"\n"
        );
        Config::from_toml(&text).unwrap().server
    }

    fn answer(method: Method, host: &str, path: &str, s: &ServerSettings) -> Response<GateBody> {
        let mut h = HeaderMap::new();
        h.insert(HOST, HeaderValue::from_str(host).unwrap());
        plain_http_answer(&method, &path.parse().unwrap(), &h, s)
    }

    #[test]
    fn get_is_redirected_with_path_and_query() {
        let r = answer(Method::GET, "app.example.com:8080", "/a/b?x=1", &server("", 443));
        assert_eq!(r.status(), 308);
        assert_eq!(r.headers()[LOCATION], "https://app.example.com/a/b?x=1");
        let r = answer(Method::HEAD, "localhost:8080", "/", &server("", 8443));
        assert_eq!(r.headers()[LOCATION], "https://localhost:8443/");
    }

    #[test]
    fn unlisted_host_is_never_a_redirect_target() {
        let r = answer(Method::GET, "evil.example", "/x", &server("\"app.example.com\"", 443));
        assert_eq!(r.headers()[LOCATION], "https://app.example.com/x");
    }

    #[test]
    fn post_is_refused() {
        assert_eq!(answer(Method::POST, "a", "/", &server("", 443)).status(), 403);
    }
}
