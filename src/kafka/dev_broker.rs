//! The embedded development broker: librdkafka's mock cluster, reachable on a fixed
//! loopback address.
//!
//! librdkafka's mock cluster speaks the Kafka wire protocol (produce, fetch, list
//! offsets, consumer groups, offset commits, idempotent producer, transactions) from
//! memory, but binds a random port and cannot create topics over the protocol. This
//! module fixes both: it creates tasklog's topics through the mock API, and serves the
//! cluster on the requested address through a small TCP relay, advertising that address
//! in metadata so every client connection goes through it.
//!
//! The relay can also be switched off and on ([`DevBroker::set_reachable`]) to test
//! what tasklog does when the broker disappears.
//!
//! The relay runs on a thread and runtime of its own: the process's clients may block
//! the main runtime's threads (closing a consumer waits for the broker to answer its
//! LeaveGroup), and a relay starved by them would leave those requests unanswered.

use std::ffi::{CStr, CString};
use std::net::SocketAddr;

use rdkafka::ClientConfig;
use rdkafka::bindings as rdsys;
use rdkafka::producer::{BaseProducer, Producer};
use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Settings of the development broker.
#[derive(Debug, Clone)]
pub struct DevBrokerOptions {
    /// Address to serve the Kafka API on (port 0 picks a free one).
    pub listen: SocketAddr,
    /// Partitions of the topics created at start.
    pub partitions: i32,
    /// Topics to create at start.
    pub topics: Vec<String>,
}

/// Errors starting the development broker.
#[derive(Debug, thiserror::Error)]
pub enum DevBrokerError {
    /// librdkafka refused to create the mock cluster.
    #[error("cannot start librdkafka's mock cluster: {0}")]
    Mock(String),
    /// The listen address is taken or not allowed.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Pointer to the mock cluster owned by [`DevBroker::client`].
struct MockHandle(*mut rdsys::rd_kafka_mock_cluster_t);

// SAFETY: every librdkafka mock-cluster function used here is thread-safe: it either
// takes the cluster's lock or posts an operation to the cluster's own thread. The
// pointer stays valid as long as the client that owns the cluster, which `DevBroker`
// keeps alive alongside it.
unsafe impl Send for MockHandle {}
unsafe impl Sync for MockHandle {}

/// A running development broker. Dropping it stops the relay and the cluster.
pub struct DevBroker {
    addr: SocketAddr,
    mock: MockHandle,
    reachable: watch::Sender<bool>,
    /// The relay's thread, and what stops it.
    relay: Option<(
        std::thread::JoinHandle<()>,
        tokio::sync::oneshot::Sender<()>,
    )>,
    // Owns the mock cluster (never read: holding it keeps the cluster alive); declared
    // last so it is dropped after the relay stops.
    _client: BaseProducer,
}

impl DevBroker {
    /// Starts the mock cluster, creates the topics, and serves it on `options.listen`.
    pub async fn start(options: &DevBrokerOptions) -> Result<DevBroker, DevBrokerError> {
        let listener =
            TcpListener::bind(options.listen)
                .await
                .map_err(|source| DevBrokerError::Listen {
                    addr: options.listen,
                    source,
                })?;
        let addr = listener
            .local_addr()
            .map_err(|source| DevBrokerError::Listen {
                addr: options.listen,
                source,
            })?;

        let client: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", "1")
            .set("log_level", "3")
            .create()
            .map_err(|e| DevBrokerError::Mock(e.to_string()))?;
        // SAFETY: the client was created with test.mock.num.brokers, so it owns a mock
        // cluster; the handle lives no longer than `client` (see `MockHandle`).
        let raw = unsafe { rdsys::rd_kafka_handle_mock_cluster(client.client().native_ptr()) };
        if raw.is_null() {
            return Err(DevBrokerError::Mock(
                "the client has no mock cluster".into(),
            ));
        }
        let mock = MockHandle(raw);
        // SAFETY: valid cluster pointer (above); librdkafka returns a NUL-terminated
        // string owned by the cluster.
        let upstream = unsafe { CStr::from_ptr(rdsys::rd_kafka_mock_cluster_bootstraps(raw)) }
            .to_string_lossy()
            .into_owned();
        let upstream: SocketAddr = upstream
            .split(',')
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| DevBrokerError::Mock(format!("unexpected bootstrap {upstream:?}")))?;

        let host =
            CString::new(addr.ip().to_string()).map_err(|e| DevBrokerError::Mock(e.to_string()))?;
        // SAFETY: valid cluster pointer; librdkafka copies the host string.
        unsafe {
            // Advertise the relay, so clients never bypass it.
            rdsys::rd_kafka_mock_broker_set_host_port(
                raw,
                1,
                host.as_ptr(),
                i32::from(addr.port()),
            );
            // A real broker's default delay (3 s) only slows tests and restarts here.
            rdsys::rd_kafka_mock_group_initial_rebalance_delay_ms(raw, 0);
        }

        let (reachable, reachable_rx) = watch::channel(true);
        let listener = listener
            .into_std()
            .map_err(|source| DevBrokerError::Listen {
                addr: options.listen,
                source,
            })?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| DevBrokerError::Mock(format!("relay runtime: {e}")))?;
        let thread = std::thread::Builder::new()
            .name("dev-broker-relay".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(listener) else {
                        return;
                    };
                    tokio::select! {
                        () = relay(listener, upstream, reachable_rx) => {}
                        _ = stopped => {}
                    }
                });
            })
            .map_err(|e| DevBrokerError::Mock(format!("relay thread: {e}")))?;
        let relay = Some((thread, stop));
        let broker = DevBroker {
            addr,
            mock,
            reachable,
            relay,
            _client: client,
        };
        for topic in &options.topics {
            broker.create_topic(topic, options.partitions)?;
        }
        Ok(broker)
    }

    /// The address clients use as `bootstrap.servers`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Creates a topic (a no-op error-free call when it already exists).
    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<(), DevBrokerError> {
        let name_c = CString::new(name).map_err(|e| DevBrokerError::Mock(e.to_string()))?;
        // SAFETY: valid cluster pointer; librdkafka copies the name.
        let err = unsafe {
            rdsys::rd_kafka_mock_topic_create(self.mock.0, name_c.as_ptr(), partitions, 1)
        };
        if err == rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
            || err == rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_TOPIC_ALREADY_EXISTS
        {
            Ok(())
        } else {
            Err(DevBrokerError::Mock(format!(
                "create topic {name}: {err:?}"
            )))
        }
    }

    /// Makes the broker reachable or not. While unreachable, existing connections are
    /// cut and new ones are closed at once, as if the broker had crashed; the log itself
    /// is kept.
    pub fn set_reachable(&self, reachable: bool) {
        self.reachable.send_replace(reachable);
    }
}

impl Drop for DevBroker {
    fn drop(&mut self) {
        // Producers close on a thread of their own, shortly after their last user lets
        // go: wait for them, so that none of them sees its broker vanish.
        super::producer::wait_closed(std::time::Duration::from_secs(3));
        if let Some((thread, stop)) = self.relay.take() {
            let _ = stop.send(());
            // Its runtime ends every connection it relays as it shuts down.
            let _ = thread.join();
        }
    }
}

async fn relay(listener: TcpListener, upstream: SocketAddr, reachable: watch::Receiver<bool>) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            continue;
        };
        if !*reachable.borrow() {
            drop(inbound);
            continue;
        }
        let mut reachable = reachable.clone();
        tokio::spawn(async move {
            let _ = inbound.set_nodelay(true);
            let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = outbound.set_nodelay(true);
            tokio::select! {
                _ = copy_bidirectional(&mut inbound, &mut outbound) => {}
                _ = reachable.wait_for(|up| !*up) => {}
            }
        });
    }
}
