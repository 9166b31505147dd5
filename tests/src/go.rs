//! Go programs the tests build with Debian's Go (installed by `cargo xtask test`): real clients
//! with Go's own crypto/tls and resolver. Each is built once per test run, under target/.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
};

/// Builds `source` (a `main` package) as `name` with `CGO_ENABLED=0` (Go's own resolver, no
/// libc) and the given `-ldflags` (`-s -w` strips it), or returns the binary already built.
pub fn build(name: &str, source: &str, ldflags: &str) -> PathBuf {
    static BUILT: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    let built = built.get_or_insert_with(HashMap::new);
    if let Some(path) = built.get(name) {
        return path.clone();
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-go").join(name);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("go.mod"), format!("module {name}\n\ngo 1.19\n")).unwrap();
    fs::write(dir.join("main.go"), source).unwrap();
    let go_home = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-go");
    let o = Command::new("go")
        // No VCS stamp: the checkout may be another user's, or not a git work tree at all.
        .args(["build", "-buildvcs=false", "-o", name, &format!("-ldflags={ldflags}"), "."])
        .current_dir(&dir)
        .env("CGO_ENABLED", "0")
        // Under target/, whatever HOME is (CI may have none); no module is fetched.
        .env("GOCACHE", go_home.join("cache"))
        .env("GOPATH", go_home.join("gopath"))
        .env("GOPROXY", "off")
        .output()
        .expect("go (Debian golang-go, installed by cargo xtask test)");
    assert!(o.status.success(), "go build {name}: {}", String::from_utf8_lossy(&o.stderr));
    let path = dir.join(name).canonicalize().unwrap();
    built.insert(name.to_string(), path.clone());
    path
}
