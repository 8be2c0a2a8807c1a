//! What every async command of the launcher runs on: a current-thread tokio runtime and the
//! one-line error at exit. Ctrl-C and SIGTERM are awaited with the peer's own
//! [`shutdown_signal`](peer::cli::shutdown_signal).

use std::process::ExitCode;

/// Runs `run` on a new current-thread runtime; an error (the runtime's own, or `run`'s) is
/// printed once, as `{who}: error: ...` with its context chain, and exits with failure.
pub(crate) fn block_on(who: &str, run: impl Future<Output = anyhow::Result<ExitCode>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{who}: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run).unwrap_or_else(|e| {
        eprintln!("{who}: error: {e:#}");
        ExitCode::FAILURE
    })
}
