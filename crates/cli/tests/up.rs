//! `flotilla up` without a NATS URL starts its own nats-server, the client commands work against
//! it with meaningful exit codes, and Ctrl-C stops everything, leaving no process behind.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use flotilla_testkit::{ChildProcess, bin, free_port};

fn flotilla_as(url: &str, creds: Option<&Path>, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(bin("flotilla"));
    cmd.args(args).env("FLOTILLA_NATS_URL", url).env_remove("FLOTILLA_CREDS");
    if let Some(c) = creds {
        cmd.env("FLOTILLA_CREDS", c);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn nats_server_pid(data_dir: &Path) -> Option<u32> {
    let dir = data_dir.join("jetstream/ports");
    std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        let name = e.file_name().into_string().ok()?;
        name.strip_suffix(".ports")?.rsplit('_').next()?.parse().ok()
    })
}

fn alive(pid: u32) -> bool {
    // A zombie is not alive; a reaped process has no /proc entry.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2).is_none_or(|st| st != "Z"))
        .unwrap_or(false)
}

#[test]
fn up_runs_its_own_nats_and_leaves_nothing_behind() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    // What `up` shows in the terminal, kept to look at.
    let terminal = data.path().join("terminal.txt");
    let mut cmd = Command::new(bin("flotilla"));
    cmd.args([
        "up",
        "--data-dir",
        data.path().to_str().unwrap(),
        "--port",
        &port.to_string(),
        "--monitor-addr",
        "127.0.0.1:0",
    ])
    .env("FLOTILLA_NATS_URL", "")
    .env_remove("RUST_LOG")
    .stdin(std::process::Stdio::null())
    .stderr(std::fs::File::create(&terminal).unwrap());
    let mut up = ChildProcess::spawn_command(cmd, "flotilla up").unwrap();

    // `up` runs its server with authentication: the CLI connects as `up`'s operator.
    let operator = data.path().join("auth/creds/operator-local.nk");
    let flotilla = |url: &str, args: &[&str]| flotilla_as(url, Some(&operator), args);
    // Wait until the fleet's agents are registered.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (code, out, _) = flotilla(&url, &["agents", "--json"]);
        if code == 0 && serde_json::from_str::<Vec<serde_json::Value>>(&out).is_ok_and(|v| v.len() == 3) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "agents never registered");
        std::thread::sleep(Duration::from_millis(200));
    }
    let server_pid = nats_server_pid(data.path()).expect("nats-server ports file");
    assert!(alive(server_pid));

    // submit --wait prints the completed event and exits 0.
    let (code, out, err) = flotilla(
        &url,
        &["submit", "summarize", "--input", r#"{"text":"hi"}"#, "--id", "cli-1", "--wait", "--json"],
    );
    assert_eq!(code, 0, "{err}");
    let ev: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(ev["kind"], "completed");
    assert_eq!(ev["output"]["answer"], "[writer] summarize: hi");

    // tail replays the task's events in order and stops on Ctrl-C with exit code 0.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut tail = KillOnDrop(
        Command::new(bin("flotilla"))
            .args(["tail", "--from-start", "--json", "--task", "cli-1"])
            .env("FLOTILLA_NATS_URL", &url)
            .env("FLOTILLA_CREDS", &operator)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = tail.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut kinds = Vec::new();
    while kinds.last().map(String::as_str) != Some("completed") {
        let line = rx.recv_timeout(Duration::from_secs(10)).expect("tail prints the events");
        let ev: serde_json::Value = serde_json::from_str(&line).unwrap();
        kinds.push(ev["kind"].as_str().unwrap().to_owned());
    }
    assert_eq!(kinds, ["accepted", "assigned", "started", "completed"]);
    Command::new("kill").args(["-INT", &tail.0.id().to_string()]).status().unwrap();
    assert_eq!(tail.0.wait().unwrap().code(), Some(0));

    // status: 0 for a known task, 3 for an unknown one.
    let (code, out, _) = flotilla(&url, &["status", "cli-1", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["state"], "completed");
    assert_eq!(flotilla(&url, &["status", "no-such-task"]).0, 3);
    // A rejected task exits 1 with the reason.
    let (code, _, err) = flotilla(&url, &["submit", "no.such.capability", "--wait"]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown_capability"), "{err}");
    // Without a credential the server refuses the CLI, and says how to connect.
    let (code, _, err) = flotilla_as(&url, None, &["agents"]);
    assert_eq!(code, 5);
    assert!(err.contains("without credentials"), "{err}");
    // The default tenant's submitter may submit as its tenant and follow the task.
    let submitter = data.path().join("auth/creds/submitter-default.nk");
    let (code, out, err) = flotilla_as(
        &url,
        Some(&submitter),
        &["submit", "summarize", "--input", "hello", "--tenant", "default", "--wait", "--json"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("completed"), "{out}");
    // Unreachable NATS exits 5.
    assert_eq!(flotilla(&format!("nats://127.0.0.1:{}", free_port()), &["agents"]).0, 5);

    // The status line has shown the agents (it comes every two seconds at most).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !std::fs::read_to_string(&terminal).unwrap_or_default().contains("agents 3") {
        assert!(std::time::Instant::now() < deadline, "no status line");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Ctrl-C, as a terminal sends it (to the whole foreground process group): clean exit, and
    // the nats-server is gone too.
    up.signal_group("INT");
    let code = up.wait_timeout(Duration::from_secs(40)).expect("flotilla up exits after Ctrl-C");
    assert_eq!(code, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while alive(server_pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!alive(server_pid), "nats-server {server_pid} left behind");

    // A calm terminal: where to look and a short status, no library logs and no colour codes;
    // the logs are in the data directory.
    let shown = std::fs::read_to_string(&terminal).unwrap();
    for want in
        ["flotilla is up", "dashboard http://127.0.0.1:", "/metrics", "flotilla.log", "agents 3", "stopped"]
    {
        assert!(shown.contains(want), "{want} in\n{shown}");
    }
    assert!(!shown.contains('\x1b') && !shown.contains(" INFO "), "no logs on the terminal:\n{shown}");
    let logs = std::fs::read_to_string(data.path().join("flotilla.log")).unwrap();
    assert!(logs.contains(" INFO ") && !logs.contains('\x1b'), "{logs}");
}
