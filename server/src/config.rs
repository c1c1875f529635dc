//! Configuration: compiled defaults, then an optional TOML file, then NERVE_* environment variables,
//! then command-line flags. Unknown keys in the file are refused by name.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::{bus::BusSettings, error::Error, event::Limits};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The value of `store` and `streams` that selects the built-in backend.
pub const EMBEDDED: &str = "embedded";

/// Settings of the Postgres store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// Connections in the pool of each replica; at least 2, since the commit listener holds one.
    pub max_connections: u32,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            max_connections: 16,
        }
    }
}

/// Settings of the Redis streams.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// Prefix of every key and channel, so several deployments can share one Redis.
    pub key_prefix: String,
    /// Approximate length each stream is trimmed to; older events stay in Postgres.
    pub stream_max_len: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            key_prefix: "nerve".into(),
            stream_max_len: 100_000,
        }
    }
}

/// Every setting of the server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Directory of the embedded backend's database.
    pub data_dir: PathBuf,
    /// Event store: "embedded" (SQLite in data_dir) or a postgres:// URL.
    pub store: String,
    /// Live streams: "embedded" (in-process) or a redis:// URL; Redis needs the Postgres store.
    pub streams: String,
    pub postgres: PostgresConfig,
    pub redis: RedisConfig,
    pub metrics: crate::metrics::MetricsConfig,
    pub tracing: crate::telemetry::TracingConfig,
    pub log_format: LogFormat,
    /// Log filter, e.g. "info" or "nerve=debug,info".
    pub log_level: String,
    /// How often backends are checked for the health service; one that does not answer within the
    /// interval (at least 1 s) counts as down.
    #[serde(with = "humantime_serde")]
    pub health_check_interval: Duration,
    /// After the first SIGTERM/SIGINT, how long the server reports itself not ready while it still
    /// serves, so load balancers stop routing to it before its listeners close; a second signal ends
    /// the wait. 0s = stop at once.
    #[serde(with = "humantime_serde")]
    pub shutdown_delay: Duration,
    /// Once the listeners close, how long open calls get to end; then the process stops without
    /// them (a subscriber that does not read holds its stream's end back for good). A publish cut
    /// then was not acknowledged (a retry of it is answered as a duplicate if it was stored); 0s
    /// stops at once, before sessions hand their deliveries back (they come back after their ack
    /// deadline).
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    pub limits: Limits,
    pub bus: BusSettings,
    /// Allow listening on a non-loopback address without authentication (logged as a warning).
    pub insecure: bool,
    /// Plaintext listener serving only grpc.health.v1 (for kubelet probes when gRPC uses TLS); "" = off.
    pub health_listen: String,
    pub tls: crate::auth::TlsConfig,
    pub auth: crate::auth::AuthConfig,
    pub connections: crate::auth::ConnectionsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            data_dir: PathBuf::from("nerve-data"),
            store: EMBEDDED.into(),
            streams: EMBEDDED.into(),
            postgres: PostgresConfig::default(),
            redis: RedisConfig::default(),
            metrics: crate::metrics::MetricsConfig::default(),
            tracing: crate::telemetry::TracingConfig::default(),
            log_format: LogFormat::Text,
            log_level: "info".into(),
            health_check_interval: Duration::from_secs(2),
            shutdown_delay: Duration::ZERO,
            shutdown_timeout: Duration::from_secs(20),
            limits: Limits::default(),
            bus: BusSettings::default(),
            insecure: false,
            health_listen: String::new(),
            tls: crate::auth::TlsConfig::default(),
            auth: crate::auth::AuthConfig::default(),
            connections: crate::auth::ConnectionsConfig::default(),
        }
    }
}

/// Command-line flags; each also reads the environment variable named in --help.
#[derive(Debug, Parser, Default)]
#[command(name = "nerve-server", version, about = "Nerve: a gRPC event bus")]
pub struct Args {
    /// TOML file with settings (keys as in the environment list below, nested as tables).
    #[arg(long, env = "NERVE_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC listen address.
    #[arg(long, env = "NERVE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory of the embedded database.
    #[arg(long, env = "NERVE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Event store: "embedded" or a postgres:// URL.
    // a URL may hold a password: --help does not print the variable's value
    #[arg(long, env = "NERVE_STORE", hide_env_values = true)]
    pub store: Option<String>,
    /// Live streams: "embedded" or a redis:// URL.
    #[arg(long, env = "NERVE_STREAMS", hide_env_values = true)]
    pub streams: Option<String>,
    /// Log line format.
    #[arg(long, env = "NERVE_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Log filter.
    #[arg(long, env = "NERVE_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Allow a non-loopback listen address without authentication.
    #[arg(long)]
    pub insecure: bool,
}

const FLAG_VARS: [&str; 7] = [
    "NERVE_CONFIG",
    "NERVE_LISTEN",
    "NERVE_DATA_DIR",
    "NERVE_STORE",
    "NERVE_STREAMS",
    "NERVE_LOG_FORMAT",
    "NERVE_LOG_LEVEL",
];

fn defaults_table() -> toml::Table {
    toml::Table::try_from(Config::default()).unwrap_or_default()
}

/// Lists every setting as its environment variable with the default value.
pub fn env_help() -> String {
    fn walk(prefix: &str, table: &toml::Table, out: &mut Vec<String>) {
        for (key, value) in table {
            let name = format!("{prefix}{}", key.to_uppercase());
            match value {
                toml::Value::Table(t) => walk(&format!("{name}__"), t, out),
                other => out.push(format!("  {name:<44} default {other}")),
            }
        }
    }
    let mut lines =
        vec!["Every setting (file key, nested with '__' in the environment):".to_owned()];
    walk("NERVE_", &defaults_table(), &mut lines);
    lines.join("\n")
}

/// Parses the process arguments, with the settings list in --help.
pub fn parse_args() -> Args {
    let command = Args::command().after_help(env_help());
    let matches = command.get_matches();
    Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

fn env_value(raw: &str, default: Option<&toml::Value>) -> toml::Value {
    // lists (key files, algorithms) are comma-separated
    if let Some(toml::Value::Array(_)) = default {
        return toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_owned()))
                .collect(),
        );
    }
    // a text setting stays text even when it looks like a number (an audience "123456")
    if let Some(toml::Value::String(_)) = default {
        return toml::Value::String(raw.to_owned());
    }
    // numbers and booleans as such, everything else (durations, paths) as strings
    if let Ok(i) = raw.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    match raw {
        "true" => toml::Value::Boolean(true),
        "false" => toml::Value::Boolean(false),
        _ => toml::Value::String(raw.to_owned()),
    }
}

/// Builds the configuration from the layers; returns it with warnings about ignored variables.
pub fn load(
    args: &Args,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(Config, Vec<String>), Error> {
    let defaults = defaults_table();
    let mut table = defaults.clone();
    if let Some(path) = &args.config {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            context: format!("reading config file {}", path.display()),
            source,
        })?;
        let file: toml::Table =
            toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        merge(&mut table, file);
        // refuse unknown keys in the file by name before env and flags are layered on
        Config::deserialize(table.clone())
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    }
    let mut warnings = Vec::new();
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix("NERVE_") else {
            continue;
        };
        if FLAG_VARS.contains(&name.as_str()) {
            continue;
        }
        let path: Vec<String> = rest.split("__").map(str::to_lowercase).collect();
        if !has_path(&defaults, &path) {
            // not an error: orchestrators inject NERVE_* variables of their own (Kubernetes service links)
            warnings.push(format!(
                "ignoring environment variable {name}: no such setting"
            ));
            continue;
        }
        let value = env_value(&raw, get_path(&defaults, &path));
        set_path(&mut table, &path, value);
    }
    let mut config =
        Config::deserialize(table).map_err(|e| Error::Config(format!("from environment: {e}")))?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(dir) = &args.data_dir {
        config.data_dir = dir.clone();
    }
    if let Some(store) = &args.store {
        config.store = store.clone();
    }
    if let Some(streams) = &args.streams {
        config.streams = streams.clone();
    }
    if let Some(format) = args.log_format {
        config.log_format = format;
    }
    if let Some(level) = &args.log_level {
        config.log_level = level.clone();
    }
    if args.insecure {
        config.insecure = true;
    }
    config.check().map_err(Error::Config)?;
    Ok((config, warnings))
}

impl Config {
    /// Fails naming the first setting the server cannot run with as given. `load` and `start` both
    /// run it: in-process servers are configured without `load`.
    pub fn check(&self) -> Result<(), String> {
        self.bus.check()?;
        self.backends()?;
        check_log_filter(&self.log_level)?;
        // zero checks (or samples, or pings) in a loop without a pause, or refuses every call
        let positive = [
            ("health_check_interval", self.health_check_interval),
            (
                "metrics.group_sample_interval",
                self.metrics.group_sample_interval,
            ),
            (
                "auth.registry_refresh_interval",
                self.auth.registry_refresh_interval,
            ),
            ("tls.handshake_timeout", self.tls.handshake_timeout),
            (
                "connections.stream_open_timeout",
                self.connections.stream_open_timeout,
            ),
            (
                "connections.keepalive_interval",
                self.connections.keepalive_interval,
            ),
            (
                "connections.keepalive_timeout",
                self.connections.keepalive_timeout,
            ),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, d)| d.is_zero()) {
            return Err(format!("{key} must be positive"));
        }
        for (key, n) in [
            (
                "connections.max_concurrent_streams",
                self.connections.max_concurrent_streams as usize,
            ),
            (
                "connections.max_streams_per_principal",
                self.connections.max_streams_per_principal,
            ),
        ] {
            if n == 0 {
                return Err(format!("{key} must be at least 1: 0 refuses every call"));
            }
        }
        // checked before the backends open: a replica configured so would otherwise connect, apply
        // migrations (or wait for another process's database lock) and only then refuse
        let authenticated = crate::auth::Auth::configured(&self.tls, &self.auth);
        if !authenticated && !self.listen.ip().is_loopback() && !self.insecure {
            return Err(format!(
                "refusing to listen on {} without authentication: configure tls.client_ca_file or \
                 auth.jwt keys, or pass --insecure (NERVE_INSECURE=true) to accept anyone who can connect",
                self.listen
            ));
        }
        if !self.tls.enabled()
            && (!self.tls.client_ca_file.is_empty() || !self.tls.key_file.is_empty())
        {
            return Err("tls.cert_file is required with tls.key_file or tls.client_ca_file".into());
        }
        let endpoint = &self.tracing.otlp_endpoint;
        if !endpoint.is_empty() && !endpoint.starts_with("http://") {
            // an https:// one would be dialled in plaintext, and every span lost without an error
            return Err(format!(
                "tracing.otlp_endpoint must be an http:// URL ({endpoint:?}): this build exports over \
                 plaintext gRPC only (for TLS to the collector, an agent or sidecar in between)"
            ));
        }
        Ok(())
    }
}

/// Which backends the settings name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// SQLite in `data_dir`, in-process streams.
    Embedded,
    /// A Postgres store and Redis streams.
    Production,
}

impl Config {
    /// The backends `store` and `streams` name together, or why they cannot run.
    pub fn backends(&self) -> Result<BackendKind, String> {
        let postgres =
            self.store.starts_with("postgres://") || self.store.starts_with("postgresql://");
        let redis = self.streams.starts_with("redis://");
        if self.store != EMBEDDED && !postgres {
            return Err(format!(
                "store must be \"{EMBEDDED}\" or a postgres:// URL, not {:?}",
                self.store
            ));
        }
        if self.streams != EMBEDDED && !redis {
            return Err(format!(
                "streams must be \"{EMBEDDED}\" or a redis:// URL, not {:?} (rediss:// is not \
                 supported: TLS to Redis is not built yet)",
                self.streams
            ));
        }
        match (postgres, redis) {
            (false, false) if self.data_dir.as_os_str().is_empty() => {
                Err("data_dir must name a directory for the embedded store".into())
            }
            (false, false) => Ok(BackendKind::Embedded),
            (true, true) if self.postgres.max_connections < 2 => Err(
                "postgres.max_connections must be at least 2: the commit listener holds one".into(),
            ),
            (true, true) => Ok(BackendKind::Production),
            (false, true) => {
                Err("Redis streams need the Postgres store: set store to a postgres:// URL".into())
            }
            (true, false) => {
                Err("the Postgres store needs Redis streams: set streams to a redis:// URL".into())
            }
        }
    }
}

/// Refuses a log filter tracing would take in a way nobody means: a bare word that is not a level
/// (`warning`) is a target name to it, which silences every other line, a failed start's included.
fn check_log_filter(filter: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let bare = !directive.contains('=') && !directive.contains('[');
        if bare && !LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "log_level: {directive:?} is not a level ({}) nor a target=level directive",
                LEVELS.join(", ")
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(filter)
        .map(|_| ())
        .map_err(|e| format!("log_level {filter:?}: {e}"))
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

fn get_path<'a>(table: &'a toml::Table, path: &[String]) -> Option<&'a toml::Value> {
    match path {
        [] => None,
        [last] => table.get(last),
        [first, rest @ ..] => get_path(table.get(first)?.as_table()?, rest),
    }
}

fn has_path(table: &toml::Table, path: &[String]) -> bool {
    match path {
        [] => false,
        [last] => table.get(last).is_some_and(|v| !v.is_table()),
        [first, rest @ ..] => table
            .get(first)
            .and_then(toml::Value::as_table)
            .is_some_and(|t| has_path(t, rest)),
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    match path {
        [] => {}
        [last] => {
            table.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            if let Some(toml::Value::Table(t)) = table.get_mut(first) {
                set_path(t, rest, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_apply_in_order_and_unknown_file_keys_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("nerve.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:1\"\n[limits]\nmax_batch_events = 7\n",
        )
        .expect("write");
        let args = Args {
            config: Some(file.clone()),
            ..Args::default()
        };
        let env = [
            ("NERVE_LIMITS__MAX_BATCH_EVENTS".to_owned(), "9".to_owned()),
            (
                "NERVE_BUS__DEFAULT_ACK_DEADLINE".to_owned(),
                "5s".to_owned(),
            ),
            ("NERVE_SERVICE_HOST".to_owned(), "10.0.0.1".to_owned()),
        ];
        let (config, warnings) = load(&args, env).expect("loads");
        assert_eq!(config.listen, SocketAddr::from(([127, 0, 0, 1], 1)));
        assert_eq!(config.limits.max_batch_events, 9);
        assert_eq!(config.bus.default_ack_deadline, Duration::from_secs(5));
        assert_eq!(warnings.len(), 1);

        std::fs::write(&file, "[limits]\nmax_batch_event = 7\n").expect("write");
        let err = load(&args, []).expect_err("unknown key");
        assert!(err.to_string().contains("max_batch_event"), "{err}");
    }

    #[test]
    fn settings_the_server_cannot_run_with_are_refused_naming_them() {
        let refused = |name: &str, value: &str, named: &str| {
            let env = [(name.to_owned(), value.to_owned())];
            let err = load(&Args::default(), env).expect_err(name).to_string();
            assert!(err.contains(named), "{name}={value}: {err}");
        };
        refused(
            "NERVE_BUS__DEFAULT_REQUEST_TIMEOUT",
            "10m",
            "bus.default_request_timeout must be positive and at most bus.max_request_timeout (300s)",
        );
        refused(
            "NERVE_BUS__MAX_REQUEST_TIMEOUT",
            "0s",
            "bus.max_request_timeout",
        );
        refused(
            "NERVE_BUS__MAX_REQUEST_TIMEOUT",
            "1000years",
            "bus.max_request_timeout",
        );
        refused(
            "NERVE_BUS__DEFAULT_ACK_DEADLINE",
            "11m",
            "bus.default_ack_deadline",
        );
        refused("NERVE_BUS__MAX_ACK_DEADLINE", "1ms", "bus.max_ack_deadline");
        refused(
            "NERVE_BUS__DEFAULT_MAX_IN_FLIGHT",
            "10001",
            "bus.default_max_in_flight",
        );
        refused(
            "NERVE_BUS__MAX_IN_FLIGHT_LIMIT",
            "0",
            "bus.max_in_flight_limit",
        );
        refused(
            "NERVE_BUS__DEFAULT_MAX_ATTEMPTS",
            "0",
            "bus.default_max_attempts",
        );
        refused(
            "NERVE_BUS__DEFAULT_HEARTBEAT",
            "10ms",
            "bus.default_heartbeat",
        );
        refused(
            "NERVE_HEALTH_CHECK_INTERVAL",
            "0s",
            "health_check_interval must be positive",
        );
        refused(
            "NERVE_METRICS__GROUP_SAMPLE_INTERVAL",
            "0s",
            "metrics.group_sample_interval must be positive",
        );
        refused(
            "NERVE_TRACING__OTLP_ENDPOINT",
            "https://collector:4317",
            "tracing.otlp_endpoint must be an http:// URL",
        );
        // zero would loop without a pause, or refuse every call
        for (name, key) in [
            (
                "NERVE_AUTH__REGISTRY_REFRESH_INTERVAL",
                "auth.registry_refresh_interval",
            ),
            ("NERVE_TLS__HANDSHAKE_TIMEOUT", "tls.handshake_timeout"),
            (
                "NERVE_CONNECTIONS__STREAM_OPEN_TIMEOUT",
                "connections.stream_open_timeout",
            ),
            (
                "NERVE_CONNECTIONS__KEEPALIVE_INTERVAL",
                "connections.keepalive_interval",
            ),
            (
                "NERVE_CONNECTIONS__KEEPALIVE_TIMEOUT",
                "connections.keepalive_timeout",
            ),
        ] {
            refused(name, "0s", &format!("{key} must be positive"));
        }
        refused(
            "NERVE_CONNECTIONS__MAX_CONCURRENT_STREAMS",
            "0",
            "connections.max_concurrent_streams must be at least 1",
        );
        refused(
            "NERVE_CONNECTIONS__MAX_STREAMS_PER_PRINCIPAL",
            "0",
            "connections.max_streams_per_principal must be at least 1",
        );
        // flag settings (clap reads their variables): refused before anything connects or listens
        let refused_args = |args: Args, named: &str| {
            let err = load(&args, []).expect_err(named).to_string();
            assert!(err.contains(named), "{args:?}: {err}");
        };
        let store = |store: &str| Args {
            store: Some(store.into()),
            ..Args::default()
        };
        refused_args(
            store("embeded"),
            r#"store must be "embedded" or a postgres:// URL, not "embeded""#,
        );
        refused_args(
            Args {
                streams: Some("rediss://r:6379".into()),
                ..store("postgres://nerve@db/nerve")
            },
            "rediss:// is not supported",
        );
        refused_args(
            store("postgres://nerve@db/nerve"),
            "the Postgres store needs Redis streams",
        );
        refused_args(
            Args {
                data_dir: Some(PathBuf::new()),
                ..Args::default()
            },
            "data_dir must name a directory",
        );
        // a log filter that would silence every line, a failed start's included
        let level = |level: &str| Args {
            log_level: Some(level.into()),
            ..Args::default()
        };
        refused_args(level("warning"), r#"log_level: "warning" is not a level"#);
        refused_args(level("info,nerve=loud"), "log_level");
        for taken in [
            "warn",
            "INFO",
            "nerve=debug,info",
            "off",
            "nerve::bus[session]=trace",
        ] {
            load(&level(taken), []).unwrap_or_else(|e| panic!("{taken}: {e}"));
        }
        // so is a listener beyond loopback without authentication, unless --insecure
        let exposed = Args {
            listen: Some("0.0.0.0:50051".parse().expect("address")),
            ..Args::default()
        };
        refused_args(
            exposed,
            "refusing to listen on 0.0.0.0:50051 without authentication",
        );
        // a bound raised with its default is taken
        let env = [
            ("NERVE_BUS__MAX_REQUEST_TIMEOUT".to_owned(), "1h".to_owned()),
            (
                "NERVE_BUS__DEFAULT_REQUEST_TIMEOUT".to_owned(),
                "10m".to_owned(),
            ),
        ];
        let (config, _) = load(&Args::default(), env).expect("loads");
        assert_eq!(config.bus.default_request_timeout, Duration::from_secs(600));
    }

    #[test]
    fn a_text_setting_from_the_environment_stays_text_when_it_looks_like_a_number() {
        let env = [
            ("NERVE_AUTH__JWT__AUDIENCE".to_owned(), "123456".to_owned()),
            ("NERVE_AUTH__JWT__ISSUER".to_owned(), "true".to_owned()),
        ];
        let (config, _) = load(&Args::default(), env).expect("loads");
        assert_eq!(config.auth.jwt.audience, "123456");
        assert_eq!(config.auth.jwt.issuer, "true");
    }
}
