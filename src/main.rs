//! The `tasklog` binary.

#[tokio::main]
async fn main() {
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
    std::process::exit(tasklog::cli::run().await);
}
