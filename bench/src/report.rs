//! Result rows, the per-scenario tables, the target summary and the JSON document.

use std::fmt::Write as _;

use serde::Serialize;

use crate::{
    procstat::Usage,
    util::{Latency, fmt_rate},
};

/// One measured figure.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Scenario key, e.g. "publish", "latency", "baseline.pg_insert".
    pub scenario: String,
    /// "embedded", "postgres+redis", "postgres", "redis", "nats".
    pub system: String,
    /// What varies inside the scenario, e.g. "batch=10 publishers=16".
    pub case: String,
    pub events: u64,
    pub seconds: f64,
    /// Events per second (deliveries per second for delivery scenarios).
    pub rate: f64,
    /// Target rate of open-loop scenarios.
    pub offered_rate: Option<f64>,
    /// Open loops: sends the schedule planned, and sends that left.
    pub planned: Option<u64>,
    pub sent: Option<u64>,
    pub latency: Option<Latency>,
    /// Open loops with a subscriber: publish -> deliver latency from the time each send was
    /// scheduled (`latency` starts when it left), so it also counts the waits for the tool's timer
    /// and for a free slot under `--max-outstanding`.
    pub latency_from_schedule: Option<Latency>,
    pub usage: Usage,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Comparisons with baseline figures of the same run.
    pub ratios: Vec<Ratio>,
    /// Slow-consumer scenario: server RSS the slow consumers added, MB (signed: below zero when
    /// the second phase's peak was lower).
    pub rss_added_mb: Option<f64>,
    /// Slow-consumer scenario: server RSS over the phase, (seconds since its start, MB), every 100 ms.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rss_over_time: Vec<(f64, f64)>,
    /// Extra facts (RSS growth, lost events, ...).
    pub note: String,
}

impl Row {
    pub fn new(scenario: &str, system: &str, case: impl Into<String>) -> Self {
        Row {
            scenario: scenario.to_owned(),
            system: system.to_owned(),
            case: case.into(),
            events: 0,
            seconds: 0.0,
            rate: 0.0,
            offered_rate: None,
            planned: None,
            sent: None,
            latency: None,
            latency_from_schedule: None,
            usage: Usage::default(),
            errors: 0,
            first_error: None,
            ratios: Vec::new(),
            rss_added_mb: None,
            rss_over_time: Vec::new(),
            note: String::new(),
        }
    }
}

/// This figure divided by a baseline figure.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    /// What was divided, e.g. "rate / postgres (raw)" or "p50 / redis (raw)".
    pub against: String,
    pub ratio: f64,
}

/// A scenario that could not run at all.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub scenario: String,
    pub system: String,
    pub error: String,
}

/// A target of the issue, evaluated.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub system: String,
    pub name: String,
    pub measured: String,
    pub required: String,
    /// None when the figures it needs were not measured.
    pub pass: Option<bool>,
}

/// Everything one run produced.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub settings: serde_json::Value,
    pub environment: Vec<(String, String)>,
    pub rows: Vec<Row>,
    pub failures: Vec<Failure>,
    pub targets: Vec<Target>,
    pub notes: Vec<String>,
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// Prints one table per scenario, in the order scenarios first appear.
pub fn print_tables(out: &mut String, report: &Report) {
    let _ = writeln!(out, "== environment");
    for (k, v) in &report.environment {
        let _ = writeln!(out, "  {k}: {v}");
    }
    let mut order: Vec<&str> = Vec::new();
    for r in &report.rows {
        if !order.contains(&r.scenario.as_str()) {
            order.push(&r.scenario);
        }
    }
    for scenario in order {
        let _ = writeln!(out, "\n== {scenario}");
        let header = [
            "system",
            "case",
            "events",
            "events/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "srv CPU%",
            "srv RSS MB",
            "infra CPU%",
            "bench CPU%",
            "steal%",
            "errors",
            "vs baseline",
        ];
        let mut lines: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
        let mut notes = Vec::new();
        for r in report.rows.iter().filter(|r| r.scenario == scenario) {
            let lat = |f: fn(&Latency) -> f64| r.latency.as_ref().map_or("-".into(), |l| ms(f(l)));
            let rate = match r.offered_rate {
                Some(o) => format!("{} (of {})", fmt_rate(r.rate), fmt_rate(o)),
                None => fmt_rate(r.rate),
            };
            lines.push(vec![
                r.system.clone(),
                r.case.clone(),
                r.events.to_string(),
                rate,
                lat(|l| l.p50_ms),
                lat(|l| l.p90_ms),
                lat(|l| l.p99_ms),
                lat(|l| l.p999_ms),
                lat(|l| l.max_ms),
                r.usage
                    .server_cpu_pct
                    .map_or("-".into(), |v| format!("{v:.0}")),
                r.usage
                    .server_rss_mb
                    .map_or("-".into(), |v| format!("{v:.0}")),
                format!("{:.0}", r.usage.infra_cpu_pct),
                format!("{:.0}", r.usage.bench_cpu_pct),
                r.usage.steal_pct.map_or("-".into(), |v| format!("{v:.0}")),
                r.errors.to_string(),
                r.ratios
                    .iter()
                    .map(|x| format!("{:.2}x {}", x.ratio, x.against))
                    .collect::<Vec<_>>()
                    .join(", "),
            ]);
            if !r.note.is_empty() {
                notes.push(format!("{} {}: {}", r.system, r.case, r.note));
            }
            if let Some(e) = &r.first_error {
                notes.push(format!("{} {}: first error: {e}", r.system, r.case));
            }
        }
        print_grid(out, &lines);
        for n in notes {
            let _ = writeln!(out, "  - {n}");
        }
    }
}

fn print_grid(out: &mut String, lines: &[Vec<String>]) {
    let cols = lines.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            lines
                .iter()
                .map(|l| l.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    for l in lines {
        let cells: Vec<String> = l
            .iter()
            .enumerate()
            .map(|(i, s)| {
                if i < 2 {
                    format!("{s:<w$}", w = widths[i])
                } else {
                    format!("{s:>w$}", w = widths[i])
                }
            })
            .collect();
        let _ = writeln!(out, "  {}", cells.join("  ").trim_end());
    }
}

/// Prints the targets with PASS / MISS.
pub fn print_summary(out: &mut String, report: &Report) {
    let _ = writeln!(out, "\n== targets");
    let mut lines = vec![vec![
        "".to_owned(),
        "system".to_owned(),
        "target".to_owned(),
        "measured".to_owned(),
        "required".to_owned(),
    ]];
    for t in &report.targets {
        let verdict = match t.pass {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "n/a",
        };
        lines.push(vec![
            verdict.to_owned(),
            t.system.clone(),
            t.name.clone(),
            t.measured.clone(),
            t.required.clone(),
        ]);
    }
    let widths: Vec<usize> = (0..5)
        .map(|c| {
            lines
                .iter()
                .map(|l| l[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for l in &lines {
        let cells: Vec<String> = l
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{s:<w$}", w = widths[i]))
            .collect();
        let _ = writeln!(out, "  {}", cells.join("  ").trim_end());
    }
    if !report.failures.is_empty() {
        let _ = writeln!(out, "\n== scenarios that failed");
        for f in &report.failures {
            let _ = writeln!(out, "  {} / {}: {}", f.system, f.scenario, f.error);
        }
    }
    for n in &report.notes {
        let _ = writeln!(out, "note: {n}");
    }
}
