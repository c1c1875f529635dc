//! Runs the README's grpcurl walkthrough against a live server, so the README cannot rot.
//!
//! Between `<!-- walkthrough -->` and `<!-- /walkthrough -->`, every line starting with `grpcurl` is run
//! (with localhost:50051 pointed at the test server) and every `# => text` line under it must appear in
//! its output. grpcurl is taken from $GRPCURL or PATH; scripts/test.sh installs it.

use std::collections::HashMap;

use crate::harness::*;

struct Step {
    command: String,
    expect: Vec<String>,
}

fn walkthrough() -> Vec<Step> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let section = readme
        .split("<!-- walkthrough -->")
        .nth(1)
        .and_then(|rest| rest.split("<!-- /walkthrough -->").next())
        .expect("README has a walkthrough section");
    let mut steps: Vec<Step> = Vec::new();
    for line in section.lines() {
        let line = line.trim();
        if line.starts_with("grpcurl ") {
            steps.push(Step {
                command: line.to_owned(),
                expect: Vec::new(),
            });
        } else if let Some(expected) = line.strip_prefix("# =>") {
            steps
                .last_mut()
                .expect("an expectation follows a command")
                .expect
                .push(expected.trim().to_owned());
        }
    }
    steps
}

fn grpcurl() -> String {
    let path = std::env::var("GRPCURL").unwrap_or_else(|_| "grpcurl".into());
    let found = std::process::Command::new(&path)
        .arg("-version")
        .output()
        .is_ok();
    assert!(
        found,
        "grpcurl not found (set GRPCURL or run scripts/test.sh, which installs it with \
         go install github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.3)"
    );
    path
}

#[tokio::test]
async fn readme_grpcurl_walkthrough_works() {
    let grpcurl = grpcurl();
    let steps = walkthrough();
    assert!(
        steps.len() >= 4,
        "walkthrough lists services, publishes, subscribes and checks health"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::spawn(dir.path(), &HashMap::new()).await;
    for step in steps {
        let command = step
            .command
            .replacen("grpcurl", &grpcurl, 1)
            .replace("localhost:50051", &server.addr.to_string());
        let output = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&command)
            .output()
            .await
            .expect("run sh");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        // a subscription runs until -max-time ends it; every other command must succeed
        if !command.contains("-max-time") {
            assert!(
                output.status.success(),
                "`{}` failed:\n{stdout}\n{stderr}",
                step.command
            );
        }
        for expected in &step.expect {
            assert!(
                stdout.contains(expected.as_str()),
                "`{}` should print {expected:?}, printed:\n{stdout}\n{stderr}",
                step.command
            );
        }
    }
}
