//! The module layering of `src/`. Every `.rs` file belongs to exactly one layer of `LAYERS` (the
//! list just below, bottom to top); a file imports only from files of its own layer or lower
//! ones; the file-level import graph has no circles (not even through a folder's `mod.rs`
//! re-exports: a child imports its siblings directly); `use super::*` appears only in
//! `#[cfg(test)]` modules. Imports are read from the source text: `crate::`, `self::`, `super::`
//! and child-module paths, in `use` items and in code, outside comments, literals and
//! `#[cfg(test)] mod … { }` blocks. `APART` names entries of one layer that never import each
//! other. `layers_self_test` plants each violation in a synthetic tree.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs;
use std::path::{Path, PathBuf};

/// Layers, bottom to top. A module may import from its own layer and those below it, never above;
/// imports inside a layer must not form a circle. Each entry is a path under src/ without `.rs`
/// (a folder covers everything under it).
const LAYERS: &[(&str, &[&str])] = &[
    ("foundation", &["http", "obs", "config"]),
    ("transport", &["transport", "upstream"]),
    ("request", &["request"]),
    ("limits", &["ratelimit"]),
    ("features", &["auth", "chatkit", "chatkit_server"]),
    ("pipeline", &["pipeline"]),
    ("server", &["server"]),
    ("entry", &["cli", "lib", "main"]),
];

/// Entries of one layer that never import the other (from, to): the HTTP and observability
/// primitives know no settings, the transport never calls the app client, and the features stay
/// independent of each other (each may use the rate limiter below them).
const APART: &[(&str, &str)] = &[
    ("http", "config"),
    ("obs", "config"),
    ("transport", "upstream"),
    ("auth", "chatkit"),
    ("auth", "chatkit_server"),
    ("chatkit", "auth"),
    ("chatkit", "chatkit_server"),
    ("chatkit_server", "auth"),
    ("chatkit_server", "chatkit"),
];

#[test]
fn layers() {
    let violations = check(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), LAYERS, APART);
    let n = violations.len();
    assert!(n == 0, "{n} layering violation(s) (LAYERS: tests/layers.rs):\n{}", violations.join("\n"));
}

/// Files (paths under src/) → files they import → the line of the first such import.
type Graph = BTreeMap<String, BTreeMap<String, usize>>;

/// A module path in a file: the module it names (from the crate root), as written, its line.
struct Ref {
    module: Vec<String>,
    text: String,
    line: usize,
    super_glob: bool,
}

/// Every violation in the tree at `src`, one line each.
fn check(src: &Path, layers: &[(&str, &[&str])], apart: &[(&str, &str)]) -> Vec<String> {
    let (mut files, mut out, mut layer_of) = (Vec::new(), Vec::new(), BTreeMap::new());
    let mut entry_of = BTreeMap::new();
    walk(src, "", &mut files);
    files.sort();
    for f in &files {
        let parts: Vec<&str> = f.trim_end_matches(".rs").split('/').collect();
        let mut hits = Vec::new(); // (length of the matching entry, its layer, the entry)
        for (n, (_, entries)) in layers.iter().enumerate() {
            let entries = entries.iter().map(|e| (e.split('/').collect::<Vec<_>>(), *e));
            hits.extend(entries.filter(|(e, _)| parts.starts_with(e)).map(|(e, name)| (e.len(), n, name)));
        }
        hits.sort();
        match hits[..] {
            [] => out.push(format!("src/{f}: matches no entry of LAYERS (add it to a layer)")),
            [.., (a, _, _), (b, _, _)] if a == b => out.push(format!("src/{f}: matches two entries of LAYERS")),
            [.., (_, n, name)] => {
                layer_of.insert(f.clone(), n);
                entry_of.insert(f.clone(), name);
            }
        }
    }
    let (mut refs, mut test_only) = (BTreeMap::new(), BTreeSet::new());
    for f in &files {
        let (found, test_children) = scan(&tokens(&fs::read_to_string(src.join(f)).unwrap()), &module_of(f));
        let dir: String = module_of(f).iter().map(|m| format!("{m}/")).collect();
        test_only.extend(test_children.iter().flat_map(|t| [format!("{dir}{t}.rs"), format!("{dir}{t}/mod.rs")]));
        refs.insert(f.clone(), found);
    }
    let (mut graph, mut reported) = (Graph::new(), BTreeSet::new());
    for (f, r) in
        refs.iter().filter(|(f, _)| !test_only.contains(*f)).flat_map(|(f, rs)| rs.iter().map(move |r| (f, r)))
    {
        let (line, text) = (r.line, &r.text);
        if r.super_glob {
            out.push(format!("src/{f}:{line}: `use {text}` outside a #[cfg(test)] module"));
        }
        let to = file_of(&r.module, &files);
        if to == *f {
            continue;
        }
        graph.entry(f.clone()).or_default().entry(to.clone()).or_insert(line);
        if let (Some(&a), Some(&b)) = (layer_of.get(f), layer_of.get(&to))
            && b > a
            && reported.insert((f, line, to.clone()))
        {
            let (from, up) = (layers[a].0, layers[b].0);
            out.push(format!("src/{f}:{line}: `{text}` imports src/{to} (layer {up}) upward from layer {from}"));
        }
        if let (Some(&a), Some(&b)) = (entry_of.get(f), entry_of.get(&to))
            && apart.contains(&(a, b))
            && reported.insert((f, line, to.clone()))
        {
            out.push(format!("src/{f}:{line}: `{text}` imports src/{to}: {a} never imports {b} (APART)"));
        }
    }
    // For each edge on a circle, the shortest circle through it: every edge worth cutting shows.
    let mut circles = BTreeSet::new();
    for (u, outs) in &graph {
        for v in outs.keys() {
            if let Some(mut c) = circle(&graph, u, v) {
                let first = (0..c.len()).min_by_key(|&i| c[i]).unwrap();
                c.rotate_left(first);
                circles.insert(c);
            }
        }
    }
    for c in circles {
        let hops: Vec<String> =
            c.iter().zip(c.iter().cycle().skip(1)).map(|(a, b)| format!("src/{a}:{}", graph[*a][*b])).collect();
        out.push(format!("circle: {} → src/{}", hops.join(" → "), c[0]));
    }
    out
}

/// The `.rs` files under `dir`, as paths relative to src/ (`rel`) with `/` separators.
fn walk(dir: &Path, rel: &str, files: &mut Vec<String>) {
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = format!("{rel}{}", entry.file_name().to_string_lossy());
        if entry.file_type().unwrap().is_dir() {
            walk(&entry.path(), &format!("{name}/"), files);
        } else if name.ends_with(".rs") {
            files.push(name);
        }
    }
}

/// The module a file is: `a/b.rs` and `a/b/mod.rs` are `a::b`; lib.rs and main.rs are crate roots.
fn module_of(file: &str) -> Vec<String> {
    let m = file.trim_end_matches(".rs");
    let m = m.strip_suffix("/mod").unwrap_or(m);
    if m == "lib" || m == "main" { Vec::new() } else { m.split('/').map(String::from).collect() }
}

/// The file of the longest prefix of `module` that has one; lib.rs if none has.
fn file_of(module: &[String], files: &[String]) -> String {
    for k in (1..=module.len()).rev() {
        let p = module[..k].join("/");
        if let Some(f) = [format!("{p}.rs"), format!("{p}/mod.rs")].into_iter().find(|f| files.contains(f)) {
            return f;
        }
    }
    "lib.rs".to_string()
}

/// The shortest circle that starts with the edge `u` → `v`, as its files (`u` once), if any.
fn circle<'g>(graph: &'g Graph, u: &'g str, v: &'g str) -> Option<Vec<&'g str>> {
    let (mut seen, mut queue) = (BTreeSet::from([v]), VecDeque::from([vec![u, v]]));
    while let Some(path) = queue.pop_front() {
        for m in graph.get(path[path.len() - 1]).into_iter().flat_map(BTreeMap::keys) {
            if m == u {
                return Some(path);
            } else if seen.insert(m.as_str()) {
                queue.push_back([&path[..], &[m.as_str()]].concat());
            }
        }
    }
    None
}

/// The code of `text` as tokens with their lines: words, `::` and single characters. Comments and
/// string and char literals are left out (`'a` without a closing `'` is a lifetime, kept).
fn tokens(text: &str) -> Vec<(String, usize)> {
    let c: Vec<char> = text.chars().collect();
    let is_ident = |x: char| x.is_alphanumeric() || x == '_';
    let at = |k: usize| c.get(k).copied().unwrap_or(' ');
    let word_end = |k: usize| (k..c.len()).find(|&j| !is_ident(c[j])).unwrap_or(c.len());
    let (mut out, mut i, mut line) = (Vec::new(), 0, 1);
    while i < c.len() {
        let r = i + usize::from(c[i] == 'b'); // r"…", r#"…"#, br"…"
        let hashes = (r + 1..c.len()).take_while(|&k| c[k] == '#').count();
        let (word, end) = match (c[i], at(i + 1)) {
            _ if at(r) == 'r' && at(r + 1 + hashes) == '"' => {
                let body = (r + 2 + hashes..c.len()).find(|&j| c[j] == '"' && (1..=hashes).all(|k| at(j + k) == '#'));
                (None, body.map_or(c.len(), |j| j + 1 + hashes))
            }
            ('"', _) => {
                let mut j = i + 1;
                while j < c.len() && c[j] != '"' {
                    j += 1 + usize::from(c[j] == '\\');
                }
                (None, j + 1)
            }
            ('\'', '\\') => (None, (i + 3..c.len()).find(|&j| c[j] == '\'').map_or(c.len(), |j| j + 1)),
            ('\'', _) if at(i + 2) == '\'' => (None, i + 3),
            ('/', '/') => (None, (i..c.len()).find(|&j| c[j] == '\n').unwrap_or(c.len())),
            ('/', '*') => {
                let (mut depth, mut j) = (0, i);
                while j < c.len() && (depth > 0 || j == i) {
                    let pair = (c[j], at(j + 1));
                    depth += i32::from(pair == ('/', '*')) - i32::from(pair == ('*', '/'));
                    j += if matches!(pair, ('/', '*') | ('*', '/')) { 2 } else { 1 };
                }
                (None, j)
            }
            (x, _) if x.is_whitespace() => (None, i + 1),
            ('r', '#') => (Some(i + 2), word_end(i + 2)), // a raw identifier
            (x, _) if is_ident(x) => (Some(i), word_end(i)),
            (':', ':') => (Some(i), i + 2),
            _ => (Some(i), i + 1),
        };
        let end = end.min(c.len());
        match word {
            Some(start) => out.push((c[start..end].iter().collect(), line)),
            None => line += c[i..end].iter().filter(|&&x| x == '\n').count(),
        }
        i = end;
    }
    out
}

/// The module paths in one file (module `here`) outside `#[cfg(test)] mod … { }` blocks, and the
/// children it declares as `#[cfg(test)] mod name;` (test-only files).
fn scan(t: &[(String, usize)], here: &[String]) -> (Vec<Ref>, Vec<String>) {
    let at = |i: usize| t.get(i).map_or("", |(s, _)| s.as_str());
    let children: BTreeSet<&str> =
        t.windows(3).filter(|w| w[0].0 == "mod" && w[2].0 == ";").map(|w| w[1].0.as_str()).collect();
    let (mut refs, mut test_children, mut i) = (Vec::new(), Vec::new(), 0);
    // Inline modules around `t[i]` (name, brace depth, under `#[cfg(test)]`); whether the item
    // being read is under `#[cfg(test)]`.
    let (mut inline, mut depth, mut cfg_test) = (Vec::<(String, i32, bool)>::new(), 0, false);
    while i < t.len() {
        let mut next = i + 1;
        match at(i) {
            "#" if (1..7).all(|k| at(i + k) == ["[", "cfg", "(", "test", ")", "]"][k - 1]) => cfg_test = true,
            "mod" if at(i + 2) == ";" && cfg_test => test_children.push(at(i + 1).to_string()),
            "mod" if at(i + 2) == "{" => {
                inline.push((at(i + 1).to_string(), depth, cfg_test));
                (depth, cfg_test, next) = (depth + 1, false, i + 3);
            }
            ";" => cfg_test = false,
            "{" => (depth, cfg_test) = (depth + 1, false),
            "}" => {
                (depth, cfg_test) = (depth - 1, false);
                if inline.last().is_some_and(|m| m.1 == depth) {
                    inline.pop();
                }
            }
            // The start of a path (`pub(in crate::a)` is a visibility, not a path).
            word if (word == "use" || at(i + 1) == "::")
                && at(i.wrapping_sub(1)) != "::"
                && (at(i.wrapping_sub(1)), at(i.wrapping_sub(2))) != ("in", "(")
                && !inline.iter().any(|m| m.2) =>
            {
                let mut leaves = Vec::new();
                next = tree(t, i + usize::from(word == "use"), &[], &mut leaves).max(i + 1);
                let module: Vec<String> = here.iter().chain(inline.iter().map(|m| &m.0)).cloned().collect();
                for (segs, line, glob) in leaves {
                    let mut abs = match segs[0].as_str() {
                        "crate" => Vec::new(),
                        "self" => module.clone(),
                        "super" => module[..module.len().saturating_sub(1)].to_vec(),
                        name if children.contains(name) => [&module[..], &segs[..1]].concat(),
                        _ => continue, // another crate
                    };
                    for s in &segs[1..] {
                        match s.as_str() {
                            "super" => _ = abs.pop(),
                            "self" => {}
                            _ => abs.push(s.clone()),
                        }
                    }
                    let super_glob = glob && !cfg_test && segs.iter().all(|s| s == "super");
                    let text = segs.join("::").trim_end_matches("::self").to_string() + if glob { "::*" } else { "" };
                    refs.push(Ref { module: abs, text, line, super_glob });
                }
            }
            _ => {}
        }
        i = next;
    }
    (refs, test_children)
}

/// Reads the path or `use` tree (`a::{b, c::{self, D as E}}`, `a::*`) at `t[i]`, after `prefix`;
/// pushes each leaf as (segments, line, ends in `*`) and returns the index after the tree.
fn tree(t: &[(String, usize)], mut i: usize, prefix: &[String], leaves: &mut Vec<(Vec<String>, usize, bool)>) -> usize {
    let at = |i: usize| t.get(i).map_or("", |(s, _)| s.as_str());
    let mut segs = prefix.to_vec();
    loop {
        let line = t.get(i).map_or(0, |(_, l)| *l);
        if at(i) == "{" {
            i += 1;
            while i < t.len() && at(i) != "}" {
                i = tree(t, i, &segs, leaves).max(i + 1); // past the item, or a `,`
            }
            return i + 1;
        } else if at(i) == "*" && !segs.is_empty() {
            leaves.push((segs, line, true));
            return i + 1;
        } else if !at(i).starts_with(|c: char| c.is_alphabetic() || c == '_') {
            if segs.len() > prefix.len() {
                leaves.push((segs, line, false)); // `a::b::<T>`
            }
            return i;
        }
        segs.push(at(i).to_string());
        i += 1;
        if at(i) != "::" {
            leaves.push((segs, line, false));
            return if at(i) == "as" { i + 2 } else { i };
        }
        i += 1;
    }
}

/// A directory removed when dropped, so a failing self-test leaves nothing behind.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn layers_self_test() {
    const TEST_LAYERS: &[(&str, &[&str])] =
        &[("foundation", &["config", "http", "obs"]), ("pipeline", &["pipeline"]), ("entry", &["lib"])];
    // (e) None of the `crate::pipeline` in config.rs is an import: comments, literals, test code.
    const CONFIG: &str = r##"//! Docs mention [`crate::pipeline::Gateway`].
/* a block /* nested */ crate::pipeline::Gateway */
pub struct Config; // crate::pipeline::Gateway
const S: (&str, &str, char) = ("crate::pipeline::X \" }", r#""crate::pipeline::X}""#, '{');
fn f<'a>(x: &'a str) -> &'a str { x }
#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Gateway;
    fn g() -> char { '}' }
}
"##;
    let clean: &[(&str, &str)] = &[
        ("lib.rs", "pub mod config;\npub mod http;\npub mod pipeline;\npub use config::Config;\n"),
        ("config.rs", CONFIG),
        ("http/mod.rs", "pub mod body;\npub use body::GateBody;\n#[cfg(test)]\nmod tests;\n"),
        ("http/tests.rs", "use super::*;\nuse crate::pipeline::Gateway;\n"),
        ("http/body.rs", "use super::super::config::Config;\npub struct GateBody(Config);\n"),
        ("pipeline.rs", "use crate::http::{self, body::{GateBody as B}};\nfn f() { crate::config::Config }\n"),
    ];
    let dir = TempDir(std::env::temp_dir().join(format!("chatkit-gate-layers-{}", std::process::id())));
    let run = |case: &str, changes: &[(&str, &str)]| {
        let root = dir.0.join(case);
        for (path, text) in clean.iter().chain(changes) {
            fs::create_dir_all(root.join(path).parent().unwrap()).unwrap();
            fs::write(root.join(path), text).unwrap();
        }
        check(&root, TEST_LAYERS, &[("obs", "config")])
    };
    // (a) A clean tree passes.
    assert_eq!(run("clean", &[]), Vec::<String>::new());
    // (b) Upward imports: by `crate::`, by `super::super::`, of a re-export at the root (lib.rs).
    let up = run("up", &[("config.rs", "pub struct Config;\nuse crate::pipeline::Gateway;\n")]);
    let expected = "src/config.rs:2: `crate::pipeline::Gateway` imports src/pipeline.rs (layer pipeline) upward from layer foundation";
    assert!(up.iter().any(|v| v == expected), "{up:#?}");
    let up = run(
        "up2",
        &[("http/body.rs", "pub struct GateBody;\nfn f() { super::super::pipeline::Gateway::<u8>::new() }\n")],
    );
    assert!(
        up.iter().any(|v| v.starts_with("src/http/body.rs:2: `super::super::pipeline::Gateway` imports")),
        "{up:#?}"
    );
    let up = run("up3", &[("http/body.rs", "use crate::Config;\npub struct GateBody;\n")]);
    assert_eq!(
        up,
        ["src/http/body.rs:1: `crate::Config` imports src/lib.rs (layer entry) upward from layer foundation"]
    );
    // (c) Circles in one layer: between two files, and a child importing its parent's re-export of it.
    let circle = run("circle", &[("config.rs", "use crate::{http::{body::{self, GateBody}}};\npub struct Config;\n")]);
    assert_eq!(circle, ["circle: src/config.rs:1 → src/http/body.rs:1 → src/config.rs"]);
    let circle = run("reexport", &[("http/body.rs", "\nuse crate::http::GateBody;\n")]);
    assert_eq!(circle, ["circle: src/http/body.rs:2 → src/http/mod.rs:2 → src/http/body.rs"]);
    // (d) `use super::*` outside a test module; a file in no layer.
    let glob = run("glob", &[("config.rs", "pub struct Config;\nmod inner {\n    use super::*;\n}\n")]);
    assert_eq!(glob, ["src/config.rs:3: `use super::*` outside a #[cfg(test)] module"]);
    assert_eq!(run("stray", &[("stray.rs", "")]), ["src/stray.rs: matches no entry of LAYERS (add it to a layer)"]);
    // (f) Two entries of one layer kept apart: obs may import http, never config.
    let apart = run("apart", &[("obs.rs", "use crate::http::body::GateBody;\nuse crate::config::Config;\n")]);
    assert_eq!(
        apart,
        ["src/obs.rs:2: `crate::config::Config` imports src/config.rs: obs never imports config (APART)"]
    );
}
