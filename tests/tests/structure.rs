//! The shape DESIGN.md §1 asks of every crate's modules: no two files import each other (no
//! import circle, however long), and a config module is a leaf (it imports other config modules
//! and the error type only). Read from the sources: `use crate::..`, `crate::x::..` paths and
//! names the crate root re-exports, outside comments and test modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module (top-level file or folder of `src/`) -> the crate's modules its code refers to.
type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without comments and without its `#[cfg(test)]` module.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or("");
    text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n")
}

/// Identifiers of `text` (words of letters, digits and underscores).
fn words(text: &str) -> Vec<&str> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '_')).filter(|w| !w.is_empty()).collect()
}

fn graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let module = |p: &Path| p.strip_prefix(src).unwrap().components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_string();
    let modules: BTreeSet<String> = files.iter().map(|p| module(p)).filter(|m| m != "lib" && m != "main").collect();
    // Names the crate root re-exports: `pub use module::{A, B}` / `pub use module::A`.
    let root = std::fs::read_to_string(src.join("lib.rs")).unwrap_or_default();
    let mut reexports: BTreeMap<String, String> = BTreeMap::new();
    for stmt in code(&root).split(';').map(str::trim).filter(|s| s.starts_with("pub use ")) {
        let w = words(stmt);
        if let Some(m) = w.get(2).filter(|m| modules.contains(**m)) {
            for name in &w[3..] {
                reexports.insert(name.to_string(), m.to_string());
            }
        }
    }
    let mut g = Graph::new();
    for path in &files {
        let me = module(path);
        if me == "lib" || me == "main" {
            continue;
        }
        let text = code(&std::fs::read_to_string(path).unwrap());
        let deps = g.entry(me.clone()).or_default();
        // `crate::a::..`, `use crate::{a, B}`, `super::a` (from a file in a folder module).
        for (i, piece) in text.split("crate::").enumerate().skip(1) {
            let _ = i;
            let refs: Vec<&str> = match piece.strip_prefix('{') {
                Some(group) => words(group.split('}').next().unwrap_or("")),
                None => words(piece).into_iter().take(1).collect(),
            };
            for r in refs {
                if let Some(m) = modules.get(r).cloned().or_else(|| reexports.get(r).cloned()) {
                    deps.insert(m);
                }
            }
        }
        deps.remove(&me);
    }
    g
}

/// A circle of imports in `g`, if there is one.
fn circle(g: &Graph) -> Option<Vec<String>> {
    fn visit(g: &Graph, m: &str, path: &mut Vec<String>, done: &mut BTreeSet<String>) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == m) {
            return Some(path[at..].to_vec());
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for d in g.get(m).into_iter().flatten() {
            if let Some(c) = visit(g, d, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    g.keys().find_map(|m| visit(g, m, &mut Vec::new(), &mut done))
}

fn crates_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates")
}

#[test]
fn no_crate_has_an_import_circle() {
    let mut checked = 0;
    for entry in std::fs::read_dir(crates_dir()).unwrap() {
        let src = entry.unwrap().path().join("src");
        if !src.is_dir() {
            continue;
        }
        let g = graph(&src);
        assert!(circle(&g).is_none(), "{}: modules import each other: {:?}", src.display(), circle(&g));
        checked += 1;
    }
    assert!(checked >= 10);
    // The check finds a circle where there is one.
    let mut g = Graph::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    g.entry("c".into()).or_default().insert("a".into());
    assert_eq!(circle(&g), Some(vec!["a".to_string(), "b".into(), "c".into()]));
}

#[test]
fn model_configs_are_leaves() {
    let g = graph(&crates_dir().join("stlm-model/src"));
    let configs = ["config", "byte_config", "sharing", "shapes", "depth"];
    for m in configs {
        let deps = &g[m];
        let outside: Vec<&String> = deps.iter().filter(|d| !configs.contains(&d.as_str()) && *d != "error").collect();
        assert!(outside.is_empty(), "stlm-model's `{m}` imports {outside:?}: a config module imports only configs and errors");
    }
    assert!(g["layers"].contains("config"), "the reader sees imports");
}

/// The size limits issue 32 set: no source file over 800 lines (split along what it does), and
/// the command line under 2,000 lines (it parses and prints; jobs are library functions).
#[test]
fn sources_stay_small_and_the_command_line_thin() {
    let mut files = Vec::new();
    rust_files(&crates_dir(), &mut files);
    let lines = |p: &Path| std::fs::read_to_string(p).unwrap().lines().count();
    let long: Vec<String> = files.iter().filter(|p| lines(p) > 800).map(|p| format!("{} ({} lines)", p.display(), lines(p))).collect();
    assert!(long.is_empty(), "source files over 800 lines: {long:?}");
    let mut cli = Vec::new();
    rust_files(&crates_dir().join("stlm-cli/src"), &mut cli);
    let total: usize = cli.iter().map(|p| lines(p)).sum();
    assert!(total < 2000, "crates/stlm-cli/src has {total} lines; move the logic into a library");
}
