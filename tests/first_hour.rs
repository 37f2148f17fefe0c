//! The framework setups a new user starts from (issue 9): presets, the `{rd}` way back to the
//! page, which introspection `Set-Cookie`s reach the browser, rotated sessions staying cached,
//! and `check` naming every problem. A real gate over real TLS, a NextAuth-like session
//! endpoint (sliding JWT cookie, `no-store`, CSRF/callback cookies) and a real app behind it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use common::gate::{GateBuilder, TestGate};
use common::sliding_session::{CALLBACK, CSRF, SESSION, SlidingSession};
use common::upstream::FakeApp;

const ROUTES: &str = r#"
[[routes]]
path = "/api/auth/"
auth = "public"
[[routes]]
path = "/"
auth = "required"
"#;

/// A browser's cookie jar, as far as these tests need one: name → value, updated from
/// `Set-Cookie` (a `Max-Age=0` removes).
#[derive(Default)]
struct Jar(BTreeMap<String, String>);

impl Jar {
    fn header(&self) -> String {
        self.0.iter().map(|(n, v)| format!("{n}={v}")).collect::<Vec<_>>().join("; ")
    }

    /// Apply a response's `Set-Cookie`s; the names set.
    fn update(&mut self, resp: &reqwest::Response) -> Vec<String> {
        let mut names = Vec::new();
        for v in resp.headers().get_all("set-cookie") {
            let v = v.to_str().unwrap();
            let (pair, attrs) = v.split_once(';').unwrap_or((v, ""));
            let (name, value) = pair.split_once('=').unwrap();
            if attrs.to_ascii_lowercase().contains("max-age=0") {
                self.0.remove(name.trim());
            } else {
                self.0.insert(name.trim().to_string(), value.trim().to_string());
            }
            names.push(name.trim().to_string());
        }
        names
    }
}

struct Setup {
    app: FakeApp,
    idp: SlidingSession,
    gate: TestGate,
    http: reqwest::Client,
}

async fn start(auth: &str) -> Setup {
    let app = FakeApp::start().await;
    let idp = SlidingSession::start().await;
    let rest = format!("[auth]\nintrospection_url = \"{}\"\n{auth}\n{ROUTES}\n[log]\nlevel = \"warn\"\n", idp.url());
    let gate = GateBuilder::new(&app.url()).rest(&rest).start().await;
    let http = gate.client();
    Setup { app, idp, gate, http }
}

impl Setup {
    async fn get(&self, path: &str, jar: &Jar) -> reqwest::Response {
        self.http.get(self.gate.url(path)).header("cookie", jar.header()).send().await.unwrap()
    }
}

/// A browser that signed in through NextAuth: its session cookie, CSRF and callback cookies.
fn signed_in_jar(idp: &SlidingSession) -> Jar {
    let mut jar = Jar::default();
    jar.0.insert(SESSION.into(), idp.sign_in("alice"));
    jar.0.insert(CSRF.into(), "browser-csrf%7Chash".into());
    jar.0.insert(CALLBACK.into(), "https%3A%2F%2Flocalhost%2Fdashboard".into());
    jar.0.insert("theme".into(), "dark".into());
    jar
}

#[tokio::test]
async fn nextauth_preset_20_requests_cost_one_introspection_and_never_touch_the_csrf_cookie() {
    let s = start("preset = \"nextauth\"").await;
    let mut jar = signed_in_jar(&s.idp);
    let first_session = jar.0[SESSION].clone();
    let mut relayed = Vec::new();
    for i in 0..20 {
        let resp = s.get(&format!("/dashboard?poll={i}"), &jar).await;
        assert_eq!(resp.status(), 200, "request {i}");
        relayed.extend(jar.update(&resp));
        assert_eq!(s.app.last().headers["x-auth-request-user"], "alice", "request {i}");
    }
    assert_eq!(s.idp.calls(), 1, "20 requests after sign-in: one introspection call, the rest are cache hits");
    assert!(relayed.iter().all(|n| n == SESSION), "only the session cookie reaches the browser: {relayed:?}");
    assert_eq!(relayed.len(), 1, "the rotated session, once");
    assert_ne!(jar.0[SESSION], first_session, "the browser holds the rotated session");
    assert_eq!(jar.0[CSRF], "browser-csrf%7Chash", "the CSRF cookie never changes");
    assert_eq!(jar.0[CALLBACK], "https%3A%2F%2Flocalhost%2Fdashboard");
    // What the session endpoint got: only the session cookie, never the CSRF token or others.
    let seen = s.idp.seen_cookies();
    assert_eq!(seen, vec![format!("{SESSION}={first_session}")]);
    // The browser's own copy is what the app sees, unchanged.
    assert!(s.app.last().headers["cookie"].to_str().unwrap().contains("__Host-next-auth.csrf-token=browser-csrf"));
}

#[tokio::test]
async fn whole_cookie_header_relays_only_names_the_request_carried_and_stays_cached() {
    let s = start("preset = \"nextauth\"\ncookies = []").await;
    let mut jar = Jar::default();
    jar.0.insert(SESSION.into(), s.idp.sign_in("bob"));
    jar.0.insert("theme".into(), "dark".into());
    let mut relayed = Vec::new();
    for i in 0..20 {
        let resp = s.get(&format!("/page/{i}"), &jar).await;
        assert_eq!(resp.status(), 200, "request {i}");
        relayed.extend(jar.update(&resp));
        assert_eq!(s.app.last().headers["x-auth-request-user"], "bob");
    }
    // The endpoint minted a CSRF and a callback cookie (the request carried none): not relayed.
    assert_eq!(relayed, vec![SESSION.to_string()], "only the carried session cookie");
    assert!(!jar.0.contains_key(CSRF) && !jar.0.contains_key(CALLBACK));
    assert_eq!(s.idp.calls(), 1);
}

#[tokio::test]
async fn a_stale_session_after_rotation_is_still_one_call_per_new_credential() {
    // cache_ttl 0: nothing cached, so each request is a call; the relayed rotation is still right.
    let s = start("preset = \"nextauth\"\ncache_ttl = \"0\"").await;
    let mut jar = signed_in_jar(&s.idp);
    for _ in 0..3 {
        let resp = s.get("/x", &jar).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(jar.update(&resp), vec![SESSION.to_string()]);
    }
    assert_eq!(s.idp.calls(), 3, "the control: without caching every request asks");
    assert_eq!(jar.0[CSRF], "browser-csrf%7Chash");
}

#[tokio::test]
async fn login_redirect_uses_the_frameworks_redirect_parameter() {
    for (auth, want) in [
        ("preset = \"nextauth\"", "/api/auth/signin?callbackUrl=%2Fdashboard%3Ftab%3D2"),
        ("preset = \"django\"", "/accounts/login/?next=%2Fdashboard%3Ftab%3D2"),
        ("login_url = \"/login?next={rd}&x=1\"", "/login?next=%2Fdashboard%3Ftab%3D2&x=1"),
        ("login_url = \"/login\"", "/login?rd=%2Fdashboard%3Ftab%3D2"),
    ] {
        let s = start(auth).await;
        let resp =
            s.http.get(s.gate.url("/dashboard?tab=2")).header("sec-fetch-mode", "navigate").send().await.unwrap();
        assert_eq!(resp.status(), 302, "{auth}");
        assert_eq!(resp.headers()["location"], want, "{auth}");
        assert_eq!(s.app.count(), 0, "{auth}: nothing reached the app");
    }
}

#[tokio::test]
async fn nextauth_chunked_session_cookies_are_forwarded_with_the_preset() {
    let s = start("preset = \"nextauth\"\nrespect_cache_control = true").await;
    let token = s.idp.sign_in("carol");
    // The endpoint reads the unchunked name; what matters here is what it was sent.
    let jar = Jar(BTreeMap::from([
        (format!("{SESSION}.0"), "part0".to_string()),
        (format!("{SESSION}.1"), "part1".to_string()),
        (SESSION.to_string(), token),
        ("other".to_string(), "x".to_string()),
    ]));
    let resp = s.get("/", &jar).await;
    assert_eq!(resp.status(), 200);
    let seen = s.idp.seen_cookies();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].contains(&format!("{SESSION}.0=part0")) && seen[0].contains(&format!("{SESSION}.1=part1")));
    assert!(!seen[0].contains("other="), "{}", seen[0]);
}

#[test]
fn check_prints_every_problem_with_its_key_type_errors_included() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:8443\"\nmax_connections = \"many\"\n[tls]\nself_signed = true\n\
         [upstream]\nurl = \"http://127.0.0.1:3000\"\ntimeuot = \"1s\"\n[auth]\npreset = \"rails\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chatkit-gate"))
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(
        errors,
        vec![
            "error: server.max_connections: expected an integer, found a string",
            "error: upstream.timeuot: unknown key",
            "error: auth.preset: must be nextauth, authjs or django (got \"rails\")",
        ],
        "{stderr}"
    );
    assert!(stderr.contains("3 problem(s)"), "{stderr}");
    assert_eq!(out.status.code(), Some(1));
}

/// The lines between `--8<-- [start:NAME]` and `--8<-- [end:NAME]` in `text`, without their
/// common indentation.
fn region(text: &str, name: &str, file: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let find = |tag: &str| {
        lines
            .iter()
            .position(|l| l.contains(&format!("--8<-- [{tag}:{name}]")))
            .unwrap_or_else(|| panic!("{file}: no --8<-- [{tag}:{name}] marker"))
    };
    let block = &lines[find("start") + 1..find("end")];
    let indent = block.iter().filter(|l| !l.trim().is_empty()).map(|l| l.len() - l.trim_start().len()).min();
    block.iter().map(|l| l.get(indent.unwrap_or(0)..).unwrap_or("")).collect::<Vec<_>>().join("\n")
}

#[test]
fn readme_snippets_are_the_files_the_browser_walks_run() {
    let root = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let mut checked = Vec::new();
    let mut rest = readme.as_str();
    while let Some(at) = rest.find("<!-- snippet: ") {
        let after = &rest[at + "<!-- snippet: ".len()..];
        let (target, after) = after.split_once(" -->").unwrap();
        let (file, name) = target.split_once('#').unwrap();
        let fence = after.find("```").unwrap();
        assert!(after[..fence].trim().is_empty(), "{target}: the marker must be right above a code block");
        let body = &after[fence..];
        let body = &body[body.find('\n').unwrap() + 1..];
        let end = body.find("\n```").unwrap();
        let text = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
        assert_eq!(body[..end], region(&text, name, file), "README snippet {target} differs from the file");
        checked.push(target.to_string());
        rest = &body[end..];
    }
    assert!(checked.len() >= 8, "README snippets checked: {checked:?}");
}
