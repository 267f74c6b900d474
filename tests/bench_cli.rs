//! `ordermesh bench` as a real process against a real `ordermesh dev`: both loops produce a
//! JSON summary with orders placed and confirmed; bad arguments fail fast and clearly.
#![allow(clippy::unwrap_used)]

mod common;

use common::{SECRET, start_dev};

use std::process::{Command, Output, Stdio};

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ordermesh"))
        .arg("bench")
        .args(args)
        .env("ORDERMESH_JWT_SECRET", SECRET)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The last line of stdout, parsed, after checking the run succeeded.
fn summary(output: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}", output.status);
    let last = stdout.lines().last().unwrap_or_default();
    let json: serde_json::Value =
        serde_json::from_str(last).unwrap_or_else(|err| panic!("last line is not JSON ({err}):\n{stdout}"));
    for key in [
        "placed_per_s",
        "confirmed_per_s",
        "place_p50_ms",
        "place_p90_ms",
        "place_p99_ms",
        "place_p999_ms",
        "place_max_ms",
        "confirm_p50_ms",
        "confirm_p99_ms",
        "errors",
        "errors_by_status",
        "mode",
        "duration_s",
    ] {
        assert!(json.get(key).is_some(), "missing `{key}` in {json}");
    }
    assert!(json["placed_per_s"].as_f64().unwrap() > 0.0, "{json}");
    assert!(json["confirmed_per_s"].as_f64().unwrap() > 0.0, "{json}");
    assert!(json["place_p50_ms"].as_f64().unwrap() > 0.0, "{json}");
    assert!(json["confirm_p99_ms"].as_f64().unwrap() > 0.0, "{json}");
    assert!(stdout.contains("latency (ms)"), "no table before the JSON:\n{stdout}");
    json
}

#[test]
fn closed_and_open_loop_runs_report_placed_and_confirmed_orders() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(dir.path(), &[]);

    let closed = summary(&bench(&[
        "--target",
        &dev.base,
        "--duration",
        "2s",
        "--concurrency",
        "8",
        "--customers",
        "50",
        "--skus",
        "10",
        "--json",
    ]));
    assert_eq!(closed["mode"], "closed");
    assert_eq!(closed["concurrency"], 8);
    assert_eq!(closed["errors"], 0, "{closed}");
    assert_eq!(closed["cancelled"], 0, "{closed}");

    let open = summary(&bench(&[
        "--target",
        &dev.base,
        "--rate",
        "50",
        "--duration",
        "2s",
        "--warmup",
        "1s",
        "--skus",
        "10",
        "--json",
    ]));
    assert_eq!(open["mode"], "open");
    assert_eq!(open["rate"], 50.0);
    // The warm-up's orders are reported apart and counted nowhere else.
    assert_eq!(open["warmup_s"], 1.0, "{open}");
    assert_eq!(open["warmup_placed"], 50, "{open}");
    assert_eq!(open["sent"], 100, "50/s for 2 s is 100 sends: {open}");
    assert_eq!(open["dropped"], 0, "{open}");
    assert_eq!(open["errors"], 0, "{open}");
    assert!(open["behind_max_ms"].is_number(), "{open}");
    // 50/s is far below what the server takes: everything is confirmed within the grace.
    assert_eq!(open["confirmed"], 100, "{open}");
}

#[test]
fn bad_arguments_fail_with_a_clear_message() {
    let cases: [(&[&str], &str); 5] = [
        (&["--target", "http://127.0.0.1:9", "--rate", "0"], "--rate must be"),
        (&["--target", "http://127.0.0.1:9", "--duration", "0s"], "--duration must be greater than 0"),
        (&["--target", "localhost:8080"], "did you mean http://localhost:8080"),
        (&["--target", "http://127.0.0.1:9", "--rate", "5", "--concurrency", "3"], "cannot be used with"),
        (&["--duration", "1s"], "--target"),
    ];
    for (args, expected) in cases {
        let output = bench(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(expected), "{args:?}: expected `{expected}` in:\n{stderr}");
    }
}

#[test]
fn an_unreachable_target_is_one_clear_error() {
    // Port 9 (discard) is closed on any test machine.
    let output = bench(&["--target", "http://127.0.0.1:9", "--duration", "1s"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("cannot reach the gateway at http://127.0.0.1:9/"), "{stderr}");
}
