//! Benchmarks: `tasklog bench submit`.

use clap::Args;

/// Arguments of `tasklog bench submit`.
#[derive(Debug, Clone, Args)]
pub struct SubmitBenchArgs {
    /// Tasks to submit in the batch phase.
    #[arg(long, default_value_t = 50_000)]
    pub tasks: usize,
}

/// Runs the submission benchmark.
pub async fn submit(_args: SubmitBenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
