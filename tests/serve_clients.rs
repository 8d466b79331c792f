//! `outcache serve` with a real client nobody here wrote: ccache (Debian's package, installed by
//! `scripts/clients.sh`, which the test command runs) compiles a C file against the server, its local
//! cache is wiped, and the second compile must be a remote hit with a byte-identical object file — on
//! the fs, SQLite and S3 (moto) backends, through the server binary with a token in the URL (HTTP Basic,
//! as ccache sends it). Without ccache the test is skipped outside CI and fails under `CI=true`.
#![cfg(feature = "cli")]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

fn ccache() -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("ccache"))
            .find(|p| p.is_file())
    });
    match found {
        Some(p) => Some(p),
        None if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true but ccache is not installed: run scripts/clients.sh install")
        }
        None => {
            eprintln!("SKIPPED: ccache is not installed (scripts/clients.sh install)");
            None
        }
    }
}

/// `outcache --url URL serve --listen LISTEN`, clear of the environment's cache settings, stdout
/// discarded and stderr piped (its first line names the address).
fn serve_command(url: &str, listen: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outcache"));
    cmd.args(["--url", url, "serve", "--listen", listen])
        .env_remove("OUTCACHE_URL")
        .env_remove("OUTCACHE_CONFIG")
        .env_remove("OUTCACHE_SERVE_TOKENS_FILE")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

type Said = std::io::Lines<BufReader<std::process::ChildStderr>>;

/// Starts the server `cmd` (stderr piped); returns it, its `http://127.0.0.1:PORT` (from the first
/// line, which it also returns) and the rest of what it says. Drain the rest: a server blocks on a
/// full pipe.
fn started(mut cmd: Command) -> (Child, String, String, Said) {
    let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let base = first
        .split(" on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {first:?}"))
        .to_owned();
    (child, base, first, lines)
}

/// Keeps reading `said` on a thread of its own, so the server never blocks on a full pipe.
fn drain(said: Said) {
    std::thread::spawn(move || for _ in said {});
}

/// Starts the server `cmd`, stops it (SIGTERM) once it has named its address, and returns the lines
/// it wrote after that one.
fn said_after_the_address(cmd: Command) -> Vec<String> {
    let (mut child, _, _, said) = started(cmd);
    unsafe_kill(&mut child);
    said.map_while(Result::ok).collect()
}

/// The server on `url` on an ephemeral port, its tokens file in `dir` holding the read-write token
/// `ccache-token`.
fn serve_with_token(url: &str, dir: &Path) -> Command {
    std::fs::write(dir.join("tokens"), "rw ccache-token\n").unwrap();
    let mut cmd = serve_command(url, "127.0.0.1:0");
    cmd.arg("--tokens-file").arg(dir.join("tokens"));
    cmd
}

/// The server on `url`, on an ephemeral port; returns the child and `http://127.0.0.1:PORT`.
fn serve(url: &str, dir: &Path, extra_env: &[(&str, &str)]) -> (Child, String) {
    let mut cmd = serve_with_token(url, dir);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let (child, base, _, said) = started(cmd);
    drain(said);
    (child, base)
}

fn compile(ccache: &Path, dir: &Path, local: &str, remote: &str, out: &str) -> String {
    let status = Command::new(ccache)
        .args(["gcc", "-c", "hello.c", "-o", out])
        .current_dir(dir)
        .env("CCACHE_DIR", dir.join(local))
        .env("CCACHE_REMOTE_STORAGE", remote)
        .env_remove("CCACHE_DISABLE")
        .status()
        .unwrap();
    assert!(status.success());
    let stats = Command::new(ccache)
        .arg("--print-stats")
        .env("CCACHE_DIR", dir.join(local))
        .output()
        .unwrap();
    String::from_utf8_lossy(&stats.stdout).into_owned()
}

fn counter(stats: &str, name: &str) -> u64 {
    stats
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

fn round_trip(ccache: &Path, url: &str, extra_env: &[(&str, &str)]) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("hello.c"),
        "int answer(void) { return 42; }\n",
    )
    .unwrap();
    let (mut server, base) = serve(url, dir.path(), extra_env);
    let host = base.trim_start_matches("http://");
    for layout in ["flat", "subdirs", "bazel"] {
        let remote = format!("http://ccache:ccache-token@{host}/{layout}|layout={layout}");
        let first = compile(
            ccache,
            dir.path(),
            &format!("{layout}-1"),
            &remote,
            "first.o",
        );
        assert_eq!(
            counter(&first, "remote_storage_miss\t"),
            1,
            "{layout}: {first}"
        );
        assert_eq!(
            counter(&first, "remote_storage_error\t"),
            0,
            "{layout}: {first}"
        );
        // A fresh local cache: the only place the result can come from is the server.
        let second = compile(
            ccache,
            dir.path(),
            &format!("{layout}-2"),
            &remote,
            "second.o",
        );
        assert_eq!(
            counter(&second, "remote_storage_hit\t"),
            1,
            "{layout}: {second}"
        );
        assert_eq!(counter(&second, "cache_miss\t"), 0, "{layout}: {second}");
        assert_eq!(
            std::fs::read(dir.path().join("first.o")).unwrap(),
            std::fs::read(dir.path().join("second.o")).unwrap(),
            "{layout}: the object file from the server differs"
        );
    }
    // Without the token, ccache's reads are refused: it counts an error, compiles locally, never hits.
    let anonymous = format!("http://{host}/flat|layout=flat");
    let refused = compile(ccache, dir.path(), "anonymous", &anonymous, "third.o");
    assert_eq!(counter(&refused, "remote_storage_hit\t"), 0, "{refused}");
    assert!(counter(&refused, "remote_storage_error\t") > 0, "{refused}");
    unsafe_kill(&mut server);
}

/// SIGTERM (the server finishes requests in flight and exits 0).
fn unsafe_kill(server: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status();
    let status = server.wait().unwrap();
    assert!(
        status.success(),
        "the server exited with {status} on SIGTERM"
    );
}

#[test]
fn ccache_gets_remote_hits_from_fs_and_sqlite() {
    let Some(ccache) = ccache() else { return };
    let dir = tempfile::tempdir().unwrap();
    round_trip(&ccache, &format!("fs://{}/fs", dir.path().display()), &[]);
    round_trip(
        &ccache,
        &format!("sqlite://{}/cache.db", dir.path().display()),
        &[],
    );
}

#[test]
fn ccache_gets_remote_hits_from_s3() {
    let Some(ccache) = ccache() else { return };
    let Some(url) = common::server_env("OUTCACHE_S3_URL") else {
        return;
    };
    let child = common::s3_child(&url, &format!("ccache-{}", uuid::Uuid::new_v4().simple()));
    round_trip(&ccache, &child, &[]);
}

/// sccache's `gcc` wrapper against the server as WebDAV storage, with the token; returns its stats.
fn sccache_compile(sccache: &Path, dir: &Path, endpoint: &str, port: u16, out: &str) -> String {
    let env = |cmd: &mut Command| {
        cmd.current_dir(dir)
            .env("SCCACHE_WEBDAV_ENDPOINT", endpoint)
            .env("SCCACHE_WEBDAV_TOKEN", "ccache-token")
            .env("SCCACHE_DIR", dir.join("sccache-local"))
            .env("SCCACHE_SERVER_PORT", port.to_string())
            .env("SCCACHE_IDLE_TIMEOUT", "0")
            .env_remove("SCCACHE_BUCKET")
            .env_remove("RUSTC_WRAPPER");
    };
    let mut compile = Command::new(sccache);
    compile.args(["gcc", "-c", "hello.c", "-o", out]);
    env(&mut compile);
    assert!(compile.status().unwrap().success(), "sccache gcc failed");
    let mut stats = Command::new(sccache);
    stats.arg("--show-stats");
    env(&mut stats);
    let said = String::from_utf8(stats.output().unwrap().stdout).unwrap();
    // A fresh sccache server for the next compile: its hits can only come from the remote storage.
    let mut stop = Command::new(sccache);
    stop.arg("--stop-server");
    env(&mut stop);
    let _ = stop.output();
    said
}

/// The figure on the line of sccache's stats that starts with `what` (then only spaces).
fn stat(stats: &str, what: &str) -> u64 {
    stats
        .lines()
        .find_map(|l| l.strip_prefix(what)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {what:?} in {stats}"))
}

/// sccache with its WebDAV storage (opendal's client, which looks up a file's folder with `PROPFIND`
/// before it writes) gets a remote hit and a byte-identical object file.
#[test]
fn sccache_gets_remote_hits_over_webdav() {
    let Some(sccache) = common::server_env("OUTCACHE_SCCACHE").map(std::path::PathBuf::from) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("hello.c"),
        "int answer(void) { return 41; }\n",
    )
    .unwrap();
    let url = format!("fs://{}/cache", dir.path().display());
    let (mut server, base) = serve(&url, dir.path(), &[]);
    let port = common::free_port();
    let endpoint = format!("{base}/sccache");
    let first = sccache_compile(&sccache, dir.path(), &endpoint, port, "first.o");
    assert_eq!(
        (
            stat(&first, "Cache misses"),
            stat(&first, "Cache write errors")
        ),
        (1, 0),
        "{first}"
    );
    let second = sccache_compile(&sccache, dir.path(), &endpoint, port, "second.o");
    assert_eq!(
        (
            stat(&second, "Cache hits"),
            stat(&second, "Cache read errors")
        ),
        (1, 0),
        "{second}"
    );
    assert_eq!(
        std::fs::read(dir.path().join("first.o")).unwrap(),
        std::fs::read(dir.path().join("second.o")).unwrap(),
        "the object file from the server differs"
    );
    unsafe_kill(&mut server);
}

fn turbo() -> Option<std::path::PathBuf> {
    common::server_env("OUTCACHE_TURBO").map(std::path::PathBuf::from)
}

/// A two-package npm workspace whose `build` writes `dist/out.txt` and a nanosecond stamp (a rebuild
/// would change the stamp; a replay from the cache restores it).
fn workspace(dir: &Path) {
    std::fs::write(
        dir.join("package.json"),
        r#"{"name":"ws","private":true,"workspaces":["packages/*"],"packageManager":"npm@10.8.2"}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("turbo.json"),
        r#"{"$schema":"https://turbo.build/schema.json","tasks":{"build":{"outputs":["dist/**"]}}}"#,
    )
    .unwrap();
    for p in ["a", "b"] {
        let pkg = dir.join("packages").join(p);
        std::fs::create_dir_all(&pkg).unwrap();
        std::fs::write(
            pkg.join("package.json"),
            format!(
                r#"{{"name":"{p}","version":"1.0.0","scripts":{{"build":"mkdir -p dist && echo built-{p} > dist/out.txt && date +%s%N > dist/stamp"}}}}"#
            ),
        )
        .unwrap();
    }
}

fn run_turbo(turbo: &Path, dir: &Path, api: &str) -> String {
    let out = Command::new(turbo)
        .args(["run", "build"])
        .current_dir(dir)
        .env("TURBO_API", api)
        .env("TURBO_TOKEN", "ccache-token")
        .env("TURBO_TEAM", "outcache-team")
        .env("TURBO_TELEMETRY_DISABLED", "1")
        .env("TURBO_NO_UPDATE_NOTIFIER", "1")
        .env("DO_NOT_TRACK", "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "turbo failed: {text}");
    text
}

fn turbo_round_trip(turbo: &Path, url: &str) {
    let server_dir = tempfile::tempdir().unwrap();
    let ws = tempfile::tempdir().unwrap();
    workspace(ws.path());
    let (mut server, base) = serve(url, server_dir.path(), &[]);
    let first = run_turbo(turbo, ws.path(), &base);
    assert!(first.contains("0 cached, 2 total"), "{first}");
    let stamp =
        |p: &str| std::fs::read(ws.path().join("packages").join(p).join("dist/stamp")).unwrap();
    let stamps = (stamp("a"), stamp("b"));
    // Wipe every local trace: the workspace's and each package's .turbo, and the outputs.
    for gone in [
        ".turbo",
        "packages/a/.turbo",
        "packages/b/.turbo",
        "packages/a/dist",
        "packages/b/dist",
    ] {
        let _ = std::fs::remove_dir_all(ws.path().join(gone));
    }
    let second = run_turbo(turbo, ws.path(), &base);
    assert!(second.contains("cache hit, replaying logs"), "{second}");
    assert!(second.contains("2 cached, 2 total"), "{second}");
    assert_eq!(
        (stamp("a"), stamp("b")),
        stamps,
        "the outputs were rebuilt, not replayed"
    );
    assert_eq!(
        std::fs::read_to_string(ws.path().join("packages/a/dist/out.txt")).unwrap(),
        "built-a\n"
    );
    unsafe_kill(&mut server);
}

#[test]
fn turbo_replays_remote_hits_from_fs_and_sqlite() {
    let Some(turbo) = turbo() else { return };
    let dir = tempfile::tempdir().unwrap();
    turbo_round_trip(&turbo, &format!("fs://{}/fs", dir.path().display()));
    turbo_round_trip(
        &turbo,
        &format!("sqlite://{}/cache.db", dir.path().display()),
    );
}

/// SIGTERM while an upload is half sent: the server stops accepting connections, lets the upload finish,
/// stores it whole, and exits 0.
#[test]
fn sigterm_finishes_an_upload_in_flight() {
    // Stored on the connection's task, and (over a MiB) on a thread of its own.
    for size in [200_000, 3_000_000] {
        sigterm_during_upload(size);
    }
}

fn sigterm_during_upload(size: u32) {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let url = format!("fs://{}/cache", dir.path().display());
    let (mut server, base) = serve(&url, dir.path(), &[]);
    let host = base.trim_start_matches("http://").to_owned();
    let body: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let half = body.len() / 2;
    let mut conn = std::net::TcpStream::connect(&host).unwrap();
    let auth = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode("u:ccache-token")
    };
    write!(
        conn,
        "PUT /inflight HTTP/1.1\r\nHost: {host}\r\nAuthorization: Basic {auth}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    conn.write_all(&body[..half]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        std::net::TcpStream::connect(&host).is_err(),
        "a new connection was accepted after SIGTERM"
    );
    conn.write_all(&body[half..]).unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let status = server.wait().unwrap();
    assert!(status.success(), "{status}");
    // Stored whole: read back through the library.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cache = outcache::Cache::open(&url).unwrap();
    let stored = rt
        .block_on(cache.get("http", &serde_json::json!({ "key": "inflight" })))
        .unwrap()
        .expect("the upload in flight was lost");
    let r = outcache::CacheRef::from_value(&stored).unwrap();
    let bytes = rt.block_on(cache.read(&r)).unwrap().unwrap();
    assert_eq!(bytes.as_ref(), body.as_slice());
}

/// A second SIGTERM stops the server at once, even with an upload stalled half-way (a first one waits
/// for it): exit 143, the upload stored nothing and left no temp file — on both store paths.
#[test]
fn a_second_sigterm_stops_at_once_and_a_stalled_upload_stores_nothing() {
    for size in [200_000u32, 3_000_000] {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let url = format!("fs://{}/cache", dir.path().display());
        let (mut server, base) = serve(&url, dir.path(), &[]);
        let host = base.trim_start_matches("http://").to_owned();
        let body: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let mut conn = std::net::TcpStream::connect(&host).unwrap();
        write!(
            conn,
            "PUT /stalled HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer ccache-token\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        conn.write_all(&body[..body.len() / 2]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let pid = server.id().to_string();
        let term = || Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        term();
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(
            server.try_wait().unwrap().is_none(),
            "{size}: the first SIGTERM did not wait for the upload in flight"
        );
        term();
        let started = std::time::Instant::now();
        let status = loop {
            if let Some(status) = server.try_wait().unwrap() {
                break status;
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "{size}: still running 10 s after the second SIGTERM"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(143), "{size}: {status}");
        drop(conn);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let cache = outcache::Cache::open(&url).unwrap();
        let stored = rt
            .block_on(cache.get("http", &serde_json::json!({ "key": "stalled" })))
            .unwrap();
        assert!(stored.is_none(), "{size}: the stalled upload was stored");
        let temps = std::fs::read_dir(dir.path().join("cache/tmp"))
            .unwrap()
            .count();
        assert_eq!(temps, 0, "{size}: the stalled upload left a temp file");
    }
}

/// A full disk: an upload that does not fit is answered 507 Insufficient Storage, stores nothing and
/// leaves no temp, and the server goes on serving uploads that fit — on fs and SQLite. Needs a 4 MiB
/// tmpfs, so it runs where the test may mount one (root in a VM, as here) and says so where not.
#[test]
fn a_full_disk_is_507_and_the_server_goes_on() {
    struct Mounted(tempfile::TempDir);
    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0.path()).status();
        }
    }
    let mnt = tempfile::tempdir().unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(mnt.path())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("note: cannot mount a tmpfs here; the full-disk case is not tried");
        return;
    }
    let mnt = Mounted(mnt);
    let tokens = tempfile::tempdir().unwrap();
    for url in [
        format!("fs://{}/cache", mnt.0.path().display()),
        format!("sqlite://{}/cache.db", mnt.0.path().display()),
    ] {
        let (mut server, base) = serve(&url, tokens.path(), &[]);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let client = reqwest::Client::new();
        let put = |key: &str, len: usize| {
            let request = client
                .put(format!("{base}/{key}"))
                .bearer_auth("ccache-token")
                .body(vec![7u8; len]);
            rt.block_on(request.send()).unwrap().status()
        };
        assert_eq!(put("big", 8 << 20), 507, "{url}");
        assert_eq!(put("small", 100_000), 200, "{url}: after a full disk");
        // Fits in what is left, though the fs writer's last preallocation step (2 MiB at 2 MiB
        // written) does not: the step is given up and the bytes written as they come.
        // (fs only: SQLite's log needs room for a second copy of the pages.)
        if url.starts_with("fs:") {
            assert_eq!(put("fits", 2_600_000), 200, "{url}: an upload that fits");
            let fits = client
                .get(format!("{base}/fits"))
                .bearer_auth("ccache-token")
                .send();
            let fits = rt.block_on(async { fits.await.unwrap().bytes().await.unwrap() });
            assert!(
                fits.len() == 2_600_000 && fits.iter().all(|&b| b == 7),
                "{url}: the upload that fits read back as {} bytes",
                fits.len()
            );
        }
        let got = client
            .get(format!("{base}/big"))
            .bearer_auth("ccache-token")
            .send();
        assert_eq!(
            rt.block_on(got).unwrap().status(),
            404,
            "{url}: the upload that did not fit"
        );
        unsafe_kill(&mut server);
        if url.starts_with("fs:") {
            let temps = std::fs::read_dir(mnt.0.path().join("cache/tmp"))
                .unwrap()
                .count();
            assert_eq!(temps, 0, "{url}: a temp file was left");
        }
        let _ = std::fs::remove_dir_all(mnt.0.path().join("cache"));
    }
}

/// Listening beyond loopback with no tokens says so on stderr, right after the address line; with
/// tokens, or on 127.0.0.1, it does not.
#[test]
fn an_open_server_beyond_loopback_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokens"), "rw t\n").unwrap();
    let url = format!("fs://{}/cache", dir.path().display());
    for (listen, tokens, warned) in [
        ("0.0.0.0:0", false, true),
        ("0.0.0.0:0", true, false),
        ("127.0.0.1:0", false, false),
    ] {
        let mut cmd = serve_command(&url, listen);
        if tokens {
            cmd.arg("--tokens-file").arg(dir.path().join("tokens"));
        }
        let rest = said_after_the_address(cmd);
        let warning = rest
            .iter()
            .any(|l| l.contains("warning") && l.contains("reachable beyond this machine"));
        assert_eq!(warning, warned, "{listen} tokens={tokens}: {rest:?}");
    }
}

/// A tokens file that holds no token (every line commented out) is refused rather than served as an
/// open cache; one that others can read is warned about, a private one is not.
#[test]
fn a_tokens_file_must_hold_a_token_and_is_warned_about_when_others_can_read_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("fs://{}/cache", dir.path().display());
    let tokens = dir.path().join("tokens");
    let server = |tokens: &Path| {
        let mut cmd = serve_command(&url, "127.0.0.1:0");
        cmd.arg("--tokens-file").arg(tokens);
        cmd
    };

    std::fs::write(&tokens, "# rw old-token\n\n").unwrap();
    let refused = server(&tokens).output().unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "served with no token: {stderr}");
    assert!(stderr.contains("holds no token"), "{stderr}");

    // So is one past 1 MiB (read no further: a path that never ends cannot take all memory).
    std::fs::write(&tokens, "# a comment line\n".repeat(150_000)).unwrap();
    let refused = server(&tokens).output().unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("larger than 1048576 bytes"), "{stderr}");

    // A line no request could use as meant (here a comment left beside the token) is refused too.
    std::fs::write(&tokens, "rw a-token  # for CI\n").unwrap();
    let refused = server(&tokens).output().unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("line 1: a token is one word"), "{stderr}");
    assert!(
        !stderr.contains("a-token"),
        "the token itself was printed: {stderr}"
    );

    std::fs::write(&tokens, "rw a-token\n").unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (mut child, _, address_line, said) = started(server(&tokens));
    unsafe_kill(&mut child);
    drop(said);
    assert!(
        address_line.ends_with("(token: 1 read-write, 0 read-only)"),
        "{address_line}"
    );
    for (mode, warned) in [(0o644, true), (0o600, false)] {
        std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(mode)).unwrap();
        let rest = said_after_the_address(server(&tokens));
        let warning = rest.iter().any(|l| l.contains("readable by others"));
        assert_eq!(warning, warned, "mode {mode:o}: {rest:?}");
        assert!(
            !rest.iter().any(|l| l.contains("a-token")),
            "the token itself was printed: {rest:?}"
        );
    }
}

/// A server whose log reader went away (`outcache serve 2>&1 | logger`, the logger gone: stderr a
/// closed pipe) goes on serving: the access log's failed writes fail no request, and SIGTERM still
/// stops it cleanly.
#[test]
fn a_closed_stderr_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("fs://{}/cache", dir.path().display());
    let (mut server, base, _, said) = started(serve_with_token(&url, dir.path()));
    drop(said);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = reqwest::Client::new();
    for i in 0..3 {
        let key = format!("{base}/k{i}");
        let put = client
            .put(&key)
            .bearer_auth("ccache-token")
            .body(format!("v{i}"));
        let status = rt.block_on(put.send()).unwrap().status();
        assert_eq!(status, 200, "PUT {i} with stderr closed");
        let got = rt.block_on(async {
            let get = client.get(&key).bearer_auth("ccache-token").send().await;
            get.unwrap().text().await.unwrap()
        });
        assert_eq!(got, format!("v{i}"));
    }
    unsafe_kill(&mut server);
}

/// SIGHUP reads the tokens file again: a revoked token is refused and a new one let in, with no
/// restart; a file that then holds no token is refused, and the tokens in use are kept.
#[test]
fn sighup_reloads_the_tokens_file() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("fs://{}/cache", dir.path().display());
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "rw old-token\n").unwrap();
    let mut cmd = serve_command(&url, "127.0.0.1:0");
    cmd.arg("--tokens-file").arg(&tokens);
    let (mut server, base, _, lines) = started(cmd);
    let (said, heard) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let _ = said.send(line);
        }
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = reqwest::Client::new();
    // A read of a key not stored: 404 once the token is let in, 401 while it is not.
    let status = |token: &str| {
        let get = client.get(format!("{base}/k")).bearer_auth(token).send();
        rt.block_on(get).unwrap().status().as_u16()
    };
    let hang_up = || {
        let sent = Command::new("kill")
            .args(["-HUP", &server.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    };
    let until = |what: &str| loop {
        let line = heard
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("the server never said {what:?}"));
        if line.contains(what) {
            return line;
        }
    };
    assert_eq!((status("old-token"), status("new-token")), (404, 401));

    std::fs::write(&tokens, "rw new-token\n").unwrap();
    hang_up();
    until("reloaded tokens file");
    assert_eq!((status("old-token"), status("new-token")), (401, 404));

    std::fs::write(&tokens, "# rw new-token\n").unwrap();
    hang_up();
    let kept = until("kept the tokens in use");
    assert!(kept.contains("holds no token"), "{kept}");
    assert_eq!((status("old-token"), status("new-token")), (401, 404));
    unsafe_kill(&mut server);
}

/// The config file's `[serve]` table sets what the flags do not (a relative `tokens_file` is found
/// beside the config file), a flag beats it, `outcache config` shows where each value came from, and
/// a bad value fails naming its key.
#[test]
fn the_config_files_serve_table_sets_what_the_flags_do_not() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("secrets")).unwrap();
    std::fs::write(dir.path().join("secrets/tokens"), "rw file-token\n").unwrap();
    let config = dir.path().join("outcache.toml");
    std::fs::write(
        &config,
        format!(
            "url = \"fs://{}/cache\"\n[serve]\nlisten = \"127.0.0.1:0\"\n\
             tokens_file = \"secrets/tokens\"\nmax_body = \"1KiB\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let outcache = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_outcache"));
        cmd.arg("--config")
            .arg(&config)
            .args(args)
            .env_remove("OUTCACHE_URL")
            .env_remove("OUTCACHE_CONFIG")
            .env_remove("OUTCACHE_SERVE_TOKENS_FILE");
        cmd
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = reqwest::Client::new();
    for (flags, limit) in [(&[][..], 1024), (&["--max-body", "4KiB"][..], 4096)] {
        let mut cmd = outcache(&[&["serve"][..], flags].concat());
        cmd.stdout(Stdio::null());
        let (mut server, base, first, said) = started(cmd);
        assert!(first.contains("1 read-write"), "{first}");
        drain(said);
        let put = |len: usize, token: Option<&str>| {
            let mut request = client.put(format!("{base}/k{len}")).body(vec![1u8; len]);
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            rt.block_on(request.send()).unwrap().status().as_u16()
        };
        assert_eq!(
            put(2000, Some("file-token")),
            if limit > 2000 { 200 } else { 413 }
        );
        assert_eq!(put(100, Some("file-token")), 200);
        assert_eq!(put(100, None), 401, "the file's tokens apply");
        unsafe_kill(&mut server);
    }

    // The environment beats the file (and a flag the environment).
    std::fs::write(dir.path().join("env-tokens"), "rw env-token\n").unwrap();
    let mut cmd = outcache(&["serve"]);
    cmd.env("OUTCACHE_SERVE_TOKENS_FILE", dir.path().join("env-tokens"));
    cmd.stdout(Stdio::null());
    let (mut server, base, _, said) = started(cmd);
    drain(said);
    let status = |token: &str| {
        let get = client.get(format!("{base}/k")).bearer_auth(token).send();
        rt.block_on(get).unwrap().status().as_u16()
    };
    assert_eq!((status("env-token"), status("file-token")), (404, 401));
    unsafe_kill(&mut server);

    let shown = outcache(&["config"]).output().unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    let line = shown
        .lines()
        .find(|l| l.starts_with("serve.max_body"))
        .unwrap_or_else(|| panic!("{shown}"));
    assert!(line.contains("1024") && line.contains("(file "), "{line}");

    std::fs::write(&config, "[serve]\nlisten = \"not an address\"\n").unwrap();
    let refused = outcache(&["config"]).output().unwrap();
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("serve.listen"), "{stderr}");
    for (table, named) in [
        ("lisen = \"127.0.0.1:1\"", "lisen"),
        ("prune_every = \"0s\"", "serve.prune_every"),
    ] {
        std::fs::write(&config, format!("[serve]\n{table}\n")).unwrap();
        let refused = outcache(&["config"]).output().unwrap();
        assert_eq!(refused.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(stderr.contains(named), "{stderr}");
    }
}

/// The server raises its soft open-file limit to the hard one, and serves no more connections than
/// the limit can hold (with a warning saying so), so a busy server waits to accept instead of failing
/// its transfers with EMFILE.
#[test]
fn the_connection_cap_fits_the_open_file_limit() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("fs://{}/cache", dir.path().display());
    for (soft, hard, wanted, warned) in [
        (100, 200, "1000", Some("holds 68 connections")),
        (100, 1000, "400", None),
    ] {
        let mut cmd = serve_command(&url, "127.0.0.1:0");
        cmd.args(["--max-connections", wanted]);
        // SAFETY: setrlimit is async-signal-safe and touches only this child's limits.
        unsafe {
            cmd.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: soft,
                    rlim_max: hard,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let rest = said_after_the_address(cmd);
        let warning = rest.iter().find(|l| l.contains("open-file limit"));
        match warned {
            Some(text) => assert!(
                warning.is_some_and(|l| l.contains(text)),
                "soft {soft} hard {hard}, --max-connections {wanted}: {rest:?}"
            ),
            // 400 connections fit once the soft limit (100) is raised to the hard one (1000).
            None => assert!(warning.is_none(), "{rest:?}"),
        }
    }
}

/// Malformed requests get a 4xx and store nothing: a `..` key (sent raw: HTTP clients normalise it
/// away), a key past 1 KiB, a Bazel key that is not a digest, a malformed Turborepo hash.
#[test]
fn malformed_requests_are_refused() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let url = format!("fs://{}/cache", dir.path().display());
    let (mut server, base) = serve(&url, dir.path(), &[]);
    let host = base.trim_start_matches("http://").to_owned();
    let long = "k".repeat(2000);
    for path in [
        "/a/../b".to_owned(),
        "/a/%2e%2e/b".to_owned(),
        format!("/{long}"),
        "/ac/not-a-digest".to_owned(),
        "/cas/abc".to_owned(),
        "/v8/artifacts/bad%20hash".to_owned(),
    ] {
        let mut conn = std::net::TcpStream::connect(&host).unwrap();
        write!(
            conn,
            "PUT {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer ccache-token\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx"
        )
        .unwrap();
        let mut response = String::new();
        conn.read_to_string(&mut response).unwrap();
        assert!(
            response.starts_with("HTTP/1.1 400") || response.starts_with("HTTP/1.1 404"),
            "{path}: {response}"
        );
    }
    unsafe_kill(&mut server);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cache = outcache::Cache::open(&url).unwrap();
    let rows = rt
        .block_on(outcache::OutputCacheExt::list_rows(
            cache.backend().as_ref(),
        ))
        .unwrap();
    assert!(rows.is_empty(), "a malformed request stored {rows:?}");
}

/// Peak RSS (KiB) of a fresh server taking 64 concurrent streamed uploads of `mib` MiB each, all 64 in
/// flight at once: each waits after its first MiB until every one has started, so a small upload size
/// cannot lower the peak by finishing uploads before the last ones start (the baseline then varied
/// from 129 to 160 MiB between runs, and the comparison failed now and then).
fn peak_for_uploads(mib: usize) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("fs://{}/cache?durable=false", dir.path().display());
    let (mut server, base) = serve(&url, dir.path(), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = reqwest::Client::new();
        let all_started = std::sync::Arc::new(tokio::sync::Barrier::new(64));
        let uploads: Vec<_> = (0..64u8)
            .map(|i| {
                let (client, base) = (client.clone(), base.clone());
                let all_started = all_started.clone();
                tokio::spawn(async move {
                    let chunks =
                        futures::StreamExt::then(futures::stream::iter(0..mib), move |n| {
                            let all_started = all_started.clone();
                            async move {
                                if n == 1 {
                                    all_started.wait().await;
                                }
                                Ok::<_, std::io::Error>(vec![i; 1 << 20])
                            }
                        });
                    let response = client
                        .put(format!("{base}/big/{i}"))
                        .bearer_auth("ccache-token")
                        .body(reqwest::Body::wrap_stream(chunks))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), reqwest::StatusCode::OK);
                })
            })
            .collect();
        for u in uploads {
            u.await.unwrap();
        }
    });
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.id())).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    unsafe_kill(&mut server);
    peak_kib
}

/// The server's memory stays flat under 64 concurrent streamed uploads: four times the bytes (64 × 16
/// MiB, 1 GiB in all, against 64 × 4 MiB) leave its peak where it was — a few MiB per connection for
/// buffers, never a body held whole. `OUTCACHE_SERVE_RSS_MIB=100` compares 64 × 100 MiB with a quarter
/// of that (8 GB through the server; kept out of the default run for its disk and time).
#[test]
fn concurrent_large_uploads_keep_the_servers_memory_flat() {
    let mib: usize = std::env::var("OUTCACHE_SERVE_RSS_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let base_mib = (mib / 4).max(4);
    let small = peak_for_uploads(base_mib);
    let large = peak_for_uploads(mib);
    eprintln!(
        "serve: peak RSS {} MiB for 64 x {base_mib} MiB uploads, {} MiB for 64 x {mib} MiB",
        small >> 10,
        large >> 10
    );
    assert!(
        large < small + (small / 2) && large < 512 << 10,
        "the peak grew with the upload size: {} MiB for 64 x {base_mib} MiB, {} MiB for 64 x {mib} MiB",
        small >> 10,
        large >> 10
    );
}

/// `--prune-every` runs the janitor while serving: a row older than `--older-than` is gone on its own.
#[test]
fn the_janitor_runs_on_a_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("fs://{}/cache", dir.path().display());
    let mut cmd = serve_with_token(&url, dir.path());
    cmd.args(["--prune-every", "500ms", "--older-than", "1s"]);
    let (mut server, base, _, mut said) = started(cmd);
    // Without --orphans nothing removes what re-uploads and crashes leave: the operator is told.
    let warned = said
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.contains("--orphans") || l.contains("janitor removed"));
    assert!(
        warned
            .as_deref()
            .is_some_and(|l| l.contains("without --orphans")),
        "no warning about the orphans left: {warned:?}"
    );
    drain(said);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = reqwest::Client::new();
    let get = |path: &str| {
        let request = client
            .get(format!("{base}/{path}"))
            .bearer_auth("ccache-token");
        rt.block_on(async { request.send().await.unwrap().status() })
    };
    rt.block_on(async {
        let put = client
            .put(format!("{base}/soon-gone"))
            .bearer_auth("ccache-token")
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), reqwest::StatusCode::OK);
    });
    assert_eq!(get("soon-gone"), reqwest::StatusCode::OK);
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert_eq!(
        get("soon-gone"),
        reqwest::StatusCode::NOT_FOUND,
        "the scheduled janitor did not prune"
    );
    // And says so on /metrics, for an operator to alert on.
    let metrics = rt.block_on(metrics_of(&client, &base));
    at_least(
        &metrics,
        &[
            ("outcache_serve_janitor_runs_ok_total", 1),
            ("outcache_serve_janitor_rows_removed_total", 1),
            ("outcache_serve_janitor_last_success_timestamp_seconds", 1),
        ],
    );
    assert_eq!(
        metric(&metrics, "outcache_serve_janitor_runs_failed_total"),
        0,
        "{metrics}"
    );
    unsafe_kill(&mut server);
    // Refused with a clear error, not a panic: a zero schedule, and one that says when but not what.
    for schedule in [&["0s", "--older-than", "1d"][..], &["1m"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_outcache"))
            .args(["--url", &url, "serve", "--prune-every"])
            .args(schedule)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{schedule:?}: {said}");
        assert!(
            said.contains("--prune-every") && !said.contains("panicked"),
            "{schedule:?}: {said}"
        );
    }
    // And what to prune without a schedule: taken, it would silently never run. (A server that takes
    // it serves on: killed after a while, and the test fails on its exit code.)
    for what in [
        &["--older-than", "1d"][..],
        &["--max-size", "1GiB"],
        &["--orphans"],
    ] {
        let child = Command::new(env!("CARGO_BIN_EXE_outcache"))
            .args(["--url", &url, "serve", "--listen", "127.0.0.1:0"])
            .args(what)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id().to_string();
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            let waited = finished.recv_timeout(std::time::Duration::from_secs(10));
            if waited.is_err() {
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
            }
        });
        let out = child.wait_with_output().unwrap();
        let _ = done.send(());
        watchdog.join().unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what:?}: {said}");
        assert!(
            said.contains(what[0]) && said.contains("add --prune-every"),
            "{what:?}: {said}"
        );
    }
}

/// A row the janitor cannot read stops its orphan sweep (the blobs it references cannot be told from
/// orphans), but not the size budget: the server would otherwise never prune again and fill its
/// disk. The refusal is reported, and the rest of the prune runs.
#[test]
fn an_unreadable_row_does_not_stop_the_scheduled_size_budget() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("fs://{}/cache", dir.path().display());
    let mut cmd = serve_with_token(&url, dir.path());
    cmd.args([
        "--prune-every",
        "300ms",
        "--max-size",
        "2500KiB",
        "--orphans",
    ]);
    let (mut server, base, _, said) = started(cmd);
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let heard = lines.clone();
    std::thread::spawn(move || {
        for line in said.map_while(Result::ok) {
            heard.lock().unwrap().push(line);
        }
    });
    let garbled = dir.path().join("cache/rows/t");
    std::fs::create_dir_all(&garbled).unwrap();
    std::fs::write(
        garbled.join(format!("{}.json", "b".repeat(64))),
        b"not a row",
    )
    .unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = reqwest::Client::new();
    let status = |request: reqwest::RequestBuilder| {
        rt.block_on(async { request.send().await.unwrap().status() })
    };
    for i in 0..4 {
        let put = client
            .put(format!("{base}/big{i}"))
            .bearer_auth("ccache-token")
            .body(vec![i as u8; 1 << 20]);
        assert_eq!(status(put), reqwest::StatusCode::OK);
    }
    let removed = || -> u64 {
        lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| l.strip_prefix("outcache serve: janitor removed "))
            .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while removed() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let said = lines.lock().unwrap().join("\n");
    assert!(
        removed() >= 2,
        "the size budget never ran past the unreadable row:\n{said}"
    );
    assert!(
        said.contains("cannot be decoded") && said.contains("without the orphan sweep"),
        "the refusal was not reported:\n{said}"
    );
    let hits = (0..4)
        .filter(|i| {
            let get = client
                .get(format!("{base}/big{i}"))
                .bearer_auth("ccache-token");
            status(get) == reqwest::StatusCode::OK
        })
        .count();
    assert!(
        hits <= 2,
        "{hits} of 4 MiB-sized entries kept under 2500 KiB"
    );
    assert!(
        garbled.join(format!("{}.json", "b".repeat(64))).exists(),
        "the unreadable row was removed without --corrupt"
    );
    let metrics = rt.block_on(metrics_of(&client, &base));
    at_least(
        &metrics,
        &[
            ("outcache_serve_janitor_sweeps_blocked_total", 1),
            ("outcache_serve_janitor_runs_failed_total", 1),
            ("outcache_serve_janitor_rows_removed_total", 2),
        ],
    );
    unsafe_kill(&mut server);
}

/// The server's `/metrics` page (with the read-write token).
async fn metrics_of(client: &reqwest::Client, base: &str) -> String {
    let response = client
        .get(format!("{base}/metrics"))
        .bearer_auth("ccache-token")
        .send()
        .await
        .unwrap();
    response.text().await.unwrap()
}

/// Each unlabelled metric on `page` is at least its figure.
fn at_least(page: &str, floors: &[(&str, u64)]) {
    for &(name, floor) in floors {
        assert!(metric(page, name) >= floor, "{name} below {floor}:\n{page}");
    }
}

/// The value of the unlabelled metric `name` on a `/metrics` page.
fn metric(page: &str, name: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{page}"))
}
