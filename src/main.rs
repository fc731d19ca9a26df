//! The `tasklog` binary.

/// How long an idle blocking thread (Kafka reads, consumer closes) lingers before it
/// ends: short, so that a burst of reads leaves no threads behind for long.
const BLOCKING_THREAD_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(2);

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    // The Kafka security settings (TASKLOG_KAFKA_SECURITY_PROTOCOL, ...): checked once,
    // before anything connects; the error names the variable, never a secret.
    if let Err(e) = tasklog::kafka::KafkaSecurity::global() {
        eprintln!("error: Kafka security settings: {e}");
        std::process::exit(1);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_keep_alive(BLOCKING_THREAD_KEEP_ALIVE)
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(tasklog::cli::run());
    std::process::exit(code);
}
