//! The command line: `chatkit-gate --config PATH`, `chatkit-gate check --config PATH`, logging.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::chatkit::ChatKit;
use crate::config::{Config, LogFormat};

#[derive(Debug, Parser)]
#[command(
    name = "chatkit-gate",
    version,
    about = "TLS, forward auth, rate limits and ChatKit sessions in front of any web app"
)]
pub struct Cli {
    /// Configuration file (TOML).
    #[arg(long, short = 'c', env = "CHATKIT_GATE_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Log format (overrides log.format).
    #[arg(long, value_enum, global = true)]
    pub log_format: Option<CliLogFormat>,
    /// Log level or filter, e.g. "info" or "chatkit_gate=debug" (overrides log.level).
    #[arg(long, global = true)]
    pub log_level: Option<String>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the configuration and the secrets and files it names; exit 1 on any problem.
    Check,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CliLogFormat {
    Json,
    Text,
}

/// Log lines held for the writer thread before further lines are dropped (and counted).
pub const LOG_BUFFER_LINES: usize = 4096;

/// Set up the global tracing subscriber: stdout, written by a background thread so a slow
/// log consumer never blocks request handling. Keep the guard until exit (it flushes).
pub fn init_logging(format: LogFormat, level: &str) -> Option<crate::obs::logwriter::BatchGuard> {
    // rustls logs a warning per handshake for clients that send an IP address as SNI: noise
    // (and a cost) on a public listener, so it stays quiet unless named in the filter.
    let directives = if level.contains("rustls") { level.to_string() } else { format!("{level},rustls=error") };
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rustls=error"));
    // Lossy: when stdout stalls (a blocked pipe, a slow collector) lines are dropped and counted
    // (chatkit_gate_log_lines_dropped_total) instead of blocking a worker thread mid-request.
    // Lines are batched: one write of many lines every few milliseconds, no wake-up per line.
    let (writer, guard) = match crate::obs::logwriter::BatchWriter::start(std::io::stdout(), LOG_BUFFER_LINES) {
        Ok(started) => started,
        Err(e) => {
            eprintln!("error: cannot start the log writer thread: {e}");
            return None;
        }
    };
    if format == LogFormat::Json {
        crate::obs::logwriter::set_json_sink(writer.clone());
    }
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
        LogFormat::Text => builder.with_ansi(false).try_init(),
    };
    Some(guard)
}

/// Apply command-line overrides to the file's `[log]` settings.
pub fn log_settings(cli: &Cli, config: Option<&Config>) -> (LogFormat, String) {
    let format = match cli.log_format {
        Some(CliLogFormat::Json) => LogFormat::Json,
        Some(CliLogFormat::Text) => LogFormat::Text,
        None => config.map_or(LogFormat::Json, |c| c.log.format),
    };
    let level = cli.log_level.clone().unwrap_or_else(|| config.map_or_else(|| "info".into(), |c| c.log.level.clone()));
    (format, level)
}

/// Everything `check` finds beyond the file itself: certificates, secrets, files it names.
/// Each problem is `(key, message)`.
pub fn check_environment(config: &Config) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    crate::transport::tls::install_default_provider();
    if let Err(e) = crate::transport::tls::load(&config.tls) {
        let key = match &e {
            crate::transport::tls::TlsError::NoKey(_) => "tls.key_file",
            crate::transport::tls::TlsError::Read { path, .. } | crate::transport::tls::TlsError::Pem { path, .. }
                if matches!(&config.tls.source, crate::config::TlsSource::Files { key_file, .. } if key_file.display().to_string() == *path) =>
            {
                "tls.key_file"
            }
            _ => "tls.cert_file",
        };
        problems.push((key.to_string(), e.to_string()));
    }
    if let Some(auth) = &config.auth
        && let Some(ca) = &auth.ca_file
        && let Err(e) = std::fs::read(ca)
    {
        problems.push(("auth.ca_file".into(), format!("{}: {e}", ca.display())));
    }
    if let Some(ck) = &config.chatkit {
        problems.extend(ChatKit::check(ck));
    }
    if let Some(path) = &config.log.audit_file {
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        if !dir.is_dir() {
            problems.push(("log.audit_file".into(), format!("directory {} does not exist", dir.display())));
        }
    }
    problems
}
