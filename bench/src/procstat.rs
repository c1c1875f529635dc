//! CPU and memory of processes, read from /proc: the Nerve server, the backing services (postgres,
//! redis-server, nats-server) and this tool itself; and the host's CPU steal.

use std::{collections::HashMap, sync::LazyLock, time::Instant};

use serde::Serialize;

/// Clock ticks per second for /proc/<pid>/stat times (`getconf CLK_TCK`, 100 on Linux in practice).
static CLK_TCK: LazyLock<f64> = LazyLock::new(|| {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|v| *v > 0.0)
        .unwrap_or(100.0)
});

/// Names of the backing services whose CPU is reported as "infra".
const INFRA: &[&str] = &["postgres", "redis-server", "nats-server"];

/// utime + stime of a process, in ticks.
pub fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // the command name may contain spaces and parentheses: fields start after the last ')'
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Resident set size in MB of 10^6 bytes, the unit of the slow-consumer target (VmRSS, in KiB).
pub fn rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024.0 / 1e6)
}

/// (steal, total) ticks of all CPUs from the first line of /proc/stat. Total is user + nice + system +
/// idle + iowait + irq + softirq + steal (guest time is already counted in user and nice).
fn host_ticks(proc_stat: &str) -> Option<(u64, u64)> {
    let line = proc_stat.lines().next()?.strip_prefix("cpu ")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    (fields.len() == 8).then(|| (fields[7], fields.iter().sum()))
}

fn read_host_ticks() -> Option<(u64, u64)> {
    host_ticks(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// CPU ticks of every backing service's process but `server` (the measured one, reported apart: a
/// nats-server measured as the system counts as server CPU, not infra).
fn infra_ticks(server: Option<u32>) -> HashMap<u32, u64> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if Some(pid) == server {
            continue;
        }
        let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
            continue;
        };
        if INFRA.contains(&comm.trim())
            && let Some(t) = cpu_ticks(&pid.to_string())
        {
            out.insert(pid, t);
        }
    }
    out
}

/// CPU and memory used during one measured phase.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Usage {
    /// Server CPU, percent of one core (200 = two cores busy).
    pub server_cpu_pct: Option<f64>,
    /// Server resident memory at the end of the phase, MB.
    pub server_rss_mb: Option<f64>,
    /// postgres + redis-server + nats-server processes, percent of one core.
    pub infra_cpu_pct: f64,
    /// This tool, percent of one core.
    pub bench_cpu_pct: f64,
    /// CPU time the hypervisor gave to other guests (steal), percent of the host's CPU time: a phase
    /// measured while it is high ran on cores that were not all there.
    pub steal_pct: Option<f64>,
    /// Seconds of wall time the figures cover, to weigh them when phases are merged.
    #[serde(skip)]
    pub wall_s: f64,
}

impl Usage {
    /// The usage of phases measured one after another as one: CPU and steal weighed by each phase's
    /// wall time, RSS as at the end of the last phase that read it.
    pub fn merged(parts: &[Usage]) -> Usage {
        let wall: f64 = parts.iter().map(|u| u.wall_s).sum();
        let mean = |f: fn(&Usage) -> Option<f64>| {
            let (sum, weight) = parts
                .iter()
                .filter_map(|u| f(u).map(|v| (v * u.wall_s, u.wall_s)))
                .fold((0.0, 0.0), |(s, w), (v, uw)| (s + v, w + uw));
            (weight > 0.0).then(|| sum / weight)
        };
        Usage {
            server_cpu_pct: mean(|u| u.server_cpu_pct),
            server_rss_mb: parts.iter().rev().find_map(|u| u.server_rss_mb),
            infra_cpu_pct: mean(|u| Some(u.infra_cpu_pct)).unwrap_or(0.0),
            bench_cpu_pct: mean(|u| Some(u.bench_cpu_pct)).unwrap_or(0.0),
            steal_pct: mean(|u| u.steal_pct),
            wall_s: wall,
        }
    }
}

/// Snapshot taken at the start of a phase.
pub struct Meter {
    started: Instant,
    server: Option<(u32, u64)>,
    infra: HashMap<u32, u64>,
    own: u64,
    host: Option<(u64, u64)>,
}

impl Meter {
    pub fn start(server_pid: Option<u32>) -> Self {
        Meter {
            started: Instant::now(),
            server: server_pid.and_then(|p| cpu_ticks(&p.to_string()).map(|t| (p, t))),
            infra: infra_ticks(server_pid),
            own: cpu_ticks("self").unwrap_or(0),
            host: read_host_ticks(),
        }
    }

    pub fn finish(&self) -> Usage {
        let wall = self.started.elapsed().as_secs_f64().max(1e-9);
        let pct = |ticks: u64| ticks as f64 / *CLK_TCK / wall * 100.0;
        let (server_cpu_pct, server_rss_mb) = match self.server {
            Some((pid, t0)) => (
                cpu_ticks(&pid.to_string()).map(|t| pct(t.saturating_sub(t0))),
                rss_mb(pid),
            ),
            None => (None, None),
        };
        let infra: u64 = infra_ticks(self.server.map(|(pid, _)| pid))
            .into_iter()
            .map(|(pid, t)| t.saturating_sub(self.infra.get(&pid).copied().unwrap_or(0)))
            .sum();
        Usage {
            server_cpu_pct,
            server_rss_mb,
            infra_cpu_pct: pct(infra),
            bench_cpu_pct: pct(cpu_ticks("self").unwrap_or(0).saturating_sub(self.own)),
            steal_pct: self.host.zip(read_host_ticks()).and_then(
                |((steal0, total0), (steal1, total1))| {
                    let total = total1.saturating_sub(total0);
                    (total > 0).then(|| steal1.saturating_sub(steal0) as f64 / total as f64 * 100.0)
                },
            ),
            wall_s: wall,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Usage, host_ticks};

    #[test]
    fn merged_usage_weighs_each_phase_by_its_wall_time() {
        let phase = |cpu: Option<f64>, rss: Option<f64>, steal: f64, wall_s: f64| Usage {
            server_cpu_pct: cpu,
            server_rss_mb: rss,
            infra_cpu_pct: 10.0,
            bench_cpu_pct: cpu.unwrap_or(0.0) / 2.0,
            steal_pct: Some(steal),
            wall_s,
        };
        let u = Usage::merged(&[
            phase(Some(30.0), Some(50.0), 0.0, 3.0),
            phase(Some(70.0), Some(60.0), 40.0, 1.0),
            // a phase that could not read the server's figures counts in neither
            phase(None, None, 0.0, 1.0),
        ]);
        assert_eq!(u.server_cpu_pct, Some(40.0));
        assert_eq!(u.server_rss_mb, Some(60.0));
        assert_eq!(u.infra_cpu_pct, 10.0);
        assert_eq!(u.bench_cpu_pct, 16.0);
        assert_eq!(u.steal_pct, Some(8.0));
        assert_eq!(u.wall_s, 5.0);
        assert_eq!(Usage::merged(&[]).server_cpu_pct, None);
    }

    #[test]
    fn host_ticks_reads_steal_and_the_total_of_the_cpu_line() {
        let stat = "cpu  100 5 50 800 20 1 4 20 7 0\ncpu0 50 2 25 400 10 0 2 10 3 0\n";
        assert_eq!(host_ticks(stat), Some((20, 1000)));
        assert_eq!(host_ticks("cpu  1 2 3\n"), None);
        assert_eq!(host_ticks("intr 1 2 3 4 5 6 7 8\n"), None);
    }
}
