//! The Node side of the test suite, run against this build's binary: the
//! browser client's and the Vue composable's tests, the fixture app (type
//! check, builds, Chromium) and the dashboard in headless Chromium
//! (`clients/tests/`). Needs `npm ci --prefix clients` and
//! `npm ci --prefix clients/fixture-app` (`.ci/run` does both).

use std::io::Write;
use std::path::Path;
use std::process::Command;

/// Printed past the test harness's capture, so a skip is never silent.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// The npm package ships its own copy of the browser client served at
/// `/client.js` (an app installs the package without the rest of the
/// repository); checked here too, so a drift fails without Node.
#[test]
fn the_npm_package_ships_the_client_the_server_serves() {
    let shipped = [include_str!("../clients/lib/client.js"), include_str!("../clients/lib/client.d.ts")];
    let served = [include_str!("../assets/client.js"), include_str!("../assets/client.d.ts")];
    assert!(shipped == served, "clients/lib/ is stale: run `npm run build --prefix clients` and commit clients/lib/");
}

#[test]
fn composable_and_dashboard_in_a_real_browser() {
    let clients = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients");
    if !clients.join("node_modules").is_dir() {
        say("browser: SKIPPED: clients/node_modules is missing; run `npm ci --prefix clients` (.ci/run does)");
        return;
    }
    let output = Command::new("npm")
        .args(["test", "--silent"])
        .current_dir(&clients)
        .env("WINDFLOW_BIN", env!("CARGO_BIN_EXE_windflow-notify"))
        .output()
        .expect("run `npm test` in clients/ (is Node.js installed?)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "npm test in clients/ failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for line in stdout.lines().filter(|line| line.contains("# SKIP")) {
        say(&format!("browser: SKIPPED: {}", line.trim()));
    }
}
