//! `goms check-config`: exit codes and `file:line: reason` on the files users edit.

use std::process::Command;

fn check(args: &[&str]) -> (bool, String) {
    check_with_env(args, &[])
}

fn check_with_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_goms"))
        .arg("check-config")
        .args(args)
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .output()
        .expect("run goms");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn write(folder: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = folder.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn shipped_files_are_valid() {
    let root = env!("CARGO_MANIFEST_DIR");
    let (ok, text) = check(&[
        "--config",
        &format!("{root}/config/goms.yml"),
        "--routes",
        &format!("{root}/config/services.yml"),
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("services.yml: ok"), "{text}");
    // The shipped file routes the echo service's gRPC calls too, and the count says so.
    assert!(text.contains("routes, 1 gRPC name)"), "{text}");
}

#[test]
fn route_file_errors_name_file_and_line() {
    let folder = tempfile::tempdir().unwrap();
    let cases = [
        (
            "services:\n  user:\n    login: \"/login\n",
            "services.yml:",
            "bad YAML",
        ),
        (
            "services:\n  user:\n    login: /login\n    register: register\n",
            "services.yml:4:",
            "must start with `/`",
        ),
        (
            "services:\n  user:\n    login: /a\n    login: /b\n",
            "services.yml:4:",
            "duplicate route `login`",
        ),
        (
            "services:\n  order:\n    submit: /s\n  user:\n",
            "services.yml:4:",
            "service `user` has no routes",
        ),
        (
            "services:\n  user:\n    login:\n      path: /login\n      retrys: 1\n",
            "services.yml:5:",
            "did you mean `retries`",
        ),
        (
            "service:\n  user:\n    login: /login\n",
            "services.yml:1:",
            "did you mean `services`",
        ),
        (
            "services:\n\tuser:\n    login: /login\n",
            "services.yml:2:",
            "YAML indentation cannot use tabs",
        ),
        (
            "services:\n  user:\n    login: /login\n    maxInFlight: 0\n",
            "services.yml:4:",
            "`maxInFlight` must be a whole number from 1",
        ),
        (
            "services:\n  user:\n    login: /login\n    ejection:\n      maxPercent: 150\n",
            "services.yml:",
            "`ejection.maxPercent` must be between 1 and 100",
        ),
    ];
    for (text, position, reason) in cases {
        let path = write(&folder, "services.yml", text);
        let (ok, output) = check(&["--routes", &path]);
        assert!(!ok, "accepted: {text}");
        let expected_position = format!("{}/{position}", folder.path().display());
        assert!(
            output.contains(&expected_position),
            "want {expected_position} in {output}"
        );
        if reason != "bad YAML" {
            assert!(output.contains(reason), "want {reason:?} in {output}");
        }
    }
}

#[test]
fn config_file_errors_name_file_and_line() {
    let folder = tempfile::tempdir().unwrap();
    let path = write(
        &folder,
        "goms.yml",
        "callServiceKey: k\ngateway:\n  httpPrt: 8080\n",
    );
    let (ok, output) = check(&["--config", &path]);
    assert!(!ok);
    assert!(output.contains("goms.yml:3:"), "{output}");
    assert!(output.contains("did you mean `httpPort`"), "{output}");
}

#[test]
fn unknown_top_level_keys_list_each_expected_key_once() {
    let folder = tempfile::tempdir().unwrap();
    let path = write(
        &folder,
        "goms.yml",
        "callServiceKey: k
amqpAdr: x
",
    );
    let (ok, output) = check(&["--config", &path]);
    assert!(!ok);
    assert!(output.contains("`amqpAddr`"), "{output}");
    assert!(!output.contains("`amqpaddr`"), "alias listed too: {output}");
    assert!(output.contains("did you mean `amqpAddr`"), "{output}");
}

#[test]
fn a_goms_config_yml_loads_unchanged() {
    let folder = tempfile::tempdir().unwrap();
    let path = write(
        &folder,
        "config.yml",
        "callServiceKey: \"goms by panco\"\netcdAddr:\n  - \"192.168.125.181:2379\"\nesAddr: \"http://192.168.125.181:9200\"\namqpaddr: \"amqp://guest:guest@192.168.125.181:5672\"\nservices:\n  user:\n    register: \"/register\"\n    login: \"/login\"\n  order:\n    submit: \"/order/submit\"\n",
    );
    let (ok, output) = check(&["--config", &path]);
    assert!(ok, "{output}");
}

#[test]
fn each_flag_alone_checks_only_its_file() {
    let folder = tempfile::tempdir().unwrap();
    let good_routes = write(
        &folder,
        "services.yml",
        "services:\n  user:\n    login: /login\n",
    );
    let (ok, output) = check(&[
        "--routes",
        &good_routes,
        "--config",
        "/nonexistent/goms.yml",
    ]);
    assert!(!ok, "an explicit missing --config is an error: {output}");
    let (ok, output) = check(&["--routes", &good_routes]);
    assert!(ok, "{output}");
    assert!(!output.contains("goms.yml"), "{output}");
}

#[test]
fn help_documents_every_flag() {
    let output = Command::new(env!("CARGO_BIN_EXE_goms"))
        .args(["gateway", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--http-port",
        "--routes",
        "--etcd-addr",
        "--config",
        "--lease-ttl",
        "--log-format",
    ] {
        assert!(text.contains(flag), "{flag} missing from:\n{text}");
    }
}

#[test]
fn goms_variables_of_the_environment_are_checked_too() {
    let root = env!("CARGO_MANIFEST_DIR");
    let config = format!("{root}/config/goms.yml");
    let (ok, text) = check_with_env(
        &["--config", &config],
        &[("GOMS__GATEWAY__HTTP_PORT", "8081")],
    );
    assert!(ok, "{text}");
    assert!(
        text.contains("environment: ok (GOMS__GATEWAY__HTTP_PORT)"),
        "{text}"
    );

    let (ok, text) = check_with_env(
        &["--config", &config],
        &[("GOMS__GATEWAY__HTTP_PROT", "8081")],
    );
    assert!(!ok, "a mistyped variable passed: {text}");
    assert!(
        text.contains(
            "GOMS__GATEWAY__HTTP_PROT is not a setting; did you mean GOMS__GATEWAY__HTTP_PORT?"
        ),
        "{text}"
    );

    let (ok, text) = check_with_env(&["--config", &config], &[("GOMS__GATEWAY__THREADS", "0")]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("gateway.threads must be at least 1"),
        "{text}"
    );
}
