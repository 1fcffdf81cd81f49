//! The `dropline` binary as a user runs it. (Being an integration test of this package, it
//! also makes `cargo test` build the binary that the services tests start as a process.)

use std::process::Command;

fn dropline(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dropline"))
        .args(args)
        .env_remove("DROPLINE_CONFIG")
        .output()
        .expect("the dropline binary runs")
}

#[test]
fn one_binary_serves_and_runs_the_demo_settlement_and_health_checks() {
    let help = dropline(&["--help"]);
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for command in ["serve", "demo", "settlement", "health"] {
        assert!(
            text.lines().any(|l| l.trim_start().starts_with(command)),
            "no `{command}` in:\n{text}"
        );
    }
}

#[test]
fn serve_check_config_prints_the_settings_and_does_not_serve() {
    let checked = dropline(&["serve", "--check-config", "--listen", "127.0.0.1:7001"]);
    assert!(checked.status.success(), "{checked:?}");
    let text = String::from_utf8_lossy(&checked.stdout);
    assert!(text.contains("listen = \"127.0.0.1:7001\""), "{text}");
    assert!(text.contains("# embedded platform (no nats)"), "{text}");
}

/// A command that fails says why in plain words with its causes, even with RUST_BACKTRACE
/// set (as it is in many shells and CI): no `Error: Os { … }` Debug dump, no backtrace.
#[test]
fn a_failing_command_prints_one_plain_error_without_a_backtrace() {
    let dir = std::env::temp_dir().join(format!("dropline-cli-error-{}", std::process::id()));
    std::fs::write(&dir, b"a file where a directory must be").unwrap();
    let failed = Command::new(env!("CARGO_BIN_EXE_dropline"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .env_remove("DROPLINE_CONFIG")
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("the dropline binary runs");
    std::fs::remove_file(&dir).ok();
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
    assert!(last.starts_with("error: "), "{stderr}");
    assert!(!stderr.contains("backtrace") && !stderr.contains("Stack"), "{stderr}");
    assert!(!stderr.contains("Os {"), "a Debug dump: {stderr}");
}
