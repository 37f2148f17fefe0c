//! chatkit-gate binary: parse the CLI, set up logging, load the config, bind, run.

use std::process::ExitCode;

use clap::Parser;

use chatkit_gate::cli::{Cli, Command, check_environment, init_logging, log_settings};
use chatkit_gate::server::run_with_workers;
use chatkit_gate::transport::workers::Workers;
use chatkit_gate::{Config, Listeners};

/// jemalloc, with its background purging thread: memory freed when connections close goes back
/// to the system within seconds (glibc keeps it in its arenas).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(path) = cli.config.clone() else {
        eprintln!("error: --config PATH (or CHATKIT_GATE_CONFIG) is required");
        return ExitCode::from(2);
    };
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("error: {e}");
            }
            eprintln!("{}: {} problem(s)", path.display(), errors.0.len());
            return ExitCode::from(1);
        }
    };
    if let Some(Command::Check) = cli.command {
        let problems = check_environment(&config);
        for (key, message) in &problems {
            eprintln!("error: {key}: {message}");
        }
        if !problems.is_empty() {
            eprintln!("{}: {} problem(s)", path.display(), problems.len());
            return ExitCode::from(1);
        }
        println!("{}: OK", path.display());
        return ExitCode::SUCCESS;
    }
    let (format, level) = log_settings(&cli, Some(&config));
    let _log_guard = init_logging(format, &level);
    let threads = match config.server.worker_threads() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("error: server.workers: {e}");
            return ExitCode::from(1);
        }
    };
    // One single-threaded runtime per worker: this thread is worker 0, the others accept on the
    // same listeners and serve their own connections. No work-stealing scheduler between tasks:
    // its cross-thread queues and wake-ups cost ~20% CPU per proxied request.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let workers = match Workers::start(threads - 1) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: cannot start the worker threads: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        let listeners = Listeners::bind(&config).await?;
        run_with_workers(config, listeners, shutdown_signal(), &workers).await
    });
    drop(workers);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "chatkit-gate failed");
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!(signal = "SIGTERM", "signal received"),
                    _ = tokio::signal::ctrl_c() => tracing::info!(signal = "SIGINT", "signal received"),
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
