//! [`TestServer`]: a real Dropline server in this process, gRPC on 127.0.0.1:0 over a data
//! directory, the same `services::server::serve` that `dropline serve` runs.

use crate::fixtures::{
    connect_when_serving, create_test_hubs, operator_client, registry_client, storefront_credential,
};
use crate::fixtures::{OPERATOR_TOKEN, TEST_STOREFRONT};
use actors::journal::JournalError;
use actors::log::storage::Storage;
use actors::sled_journal::{JournalOptions, SledJournal};
use proto::checkout::v1::checkout_service_client::CheckoutServiceClient;
use proto::operator::v1::operator_service_client::OperatorServiceClient;
use proto::operator::v1::{Drop, GetDropRequest};
use proto::registry::v1::partner_registry_service_client::PartnerRegistryServiceClient;
use services::auth::{Authed, Bearer};
use services::platform::{EmbeddedStorage, Platform};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tonic::transport::Channel;

/// Where a server keeps its data: a temporary directory (removed when the server is
/// dropped) unless the caller chose one.
pub struct DataDir {
    path: PathBuf,
    _temporary: Option<tempfile::TempDir>,
}

impl DataDir {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    /// The HTTP side (`services::http`: /metrics, health, consoles), on its own port.
    pub http_addr: SocketAddr,
    pub platform: Platform,
    pub channel: Channel,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    pub dir: DataDir,
    /// The credential of the storefront `test-web`, which the checkout client calls as
    /// (empty on a server from [`TestServer::open`]).
    pub storefront_credential: String,
}

impl TestServer {
    /// A test server: a temporary directory, the operator credential [`OPERATOR_TOKEN`],
    /// the test hubs (`create_test_hubs`) and the storefront [`TEST_STOREFRONT`].
    pub async fn start() -> TestServer {
        TestServer::start_with_live_actors_max(actors::limits::LIVE_ACTORS_MAX_DEFAULT).await
    }

    /// A test server keeping at most `live_actors_max` actors of each kind running.
    pub async fn start_with_live_actors_max(live_actors_max: usize) -> TestServer {
        let temporary = tempfile::tempdir().unwrap();
        let platform = Platform::open_embedded(temporary.path(), Some(OPERATOR_TOKEN), live_actors_max)
            .await
            .unwrap();
        TestServer::with_fixtures(platform, temporary).await
    }

    /// A test server on an in-memory journal whose clock follows tokio's time from the
    /// wall-clock time now (`actors::TokioClock`): in a `#[tokio::test(start_paused = true)]`,
    /// hold expiries, SLA deadlines and swaps come at their exact times without real
    /// waiting. (Not sled: its writer is a thread whose flushes tokio cannot see, so paused
    /// time would jump ahead while one is under way.)
    pub async fn start_driven() -> TestServer {
        TestServer::start_driven_with_live_actors_max(actors::limits::LIVE_ACTORS_MAX_DEFAULT).await
    }

    /// [`TestServer::start_driven`], keeping at most `live_actors_max` actors of each kind
    /// running.
    pub async fn start_driven_with_live_actors_max(live_actors_max: usize) -> TestServer {
        let temporary = tempfile::tempdir().unwrap();
        let clock = std::sync::Arc::new(actors::TokioClock::from_system());
        let journal = actors::memory_journal::MemoryJournal::new(clock.clone());
        let storage = services::platform::EmbeddedStorage::all_in(journal);
        let platform =
            Platform::open_embedded_on(temporary.path(), Some(OPERATOR_TOKEN), live_actors_max, storage, clock)
                .await
                .unwrap();
        TestServer::with_fixtures(platform, temporary).await
    }

    /// A server over `data_dir` with `operator_token` and nothing created in it yet (the
    /// demo's embedded platform).
    pub async fn open(data_dir: &Path, operator_token: &str, live_actors_max: usize) -> anyhow::Result<TestServer> {
        let platform = Platform::open_embedded(data_dir, Some(operator_token), live_actors_max).await?;
        TestServer::serve(platform, data_dir).await
    }

    /// A server over `data_dir` (sled and the secrets there, created if missing) whose
    /// journal keeps its write-ahead log on `log_storage` (a simulated disk, or one that
    /// fails and stalls on demand: `actors::log::faulty::FaultyStorage`), with the operator
    /// credential [`OPERATOR_TOKEN`] and nothing created yet ([`TestServer::add_fixtures`]
    /// adds the test hubs and storefront). Opening it again over the same directory and
    /// storage is a restart: it recovers from them.
    pub async fn on_log_storage(
        data_dir: &Path,
        log_storage: Arc<dyn Storage>,
        options: JournalOptions,
    ) -> anyhow::Result<TestServer> {
        std::fs::create_dir_all(data_dir)?;
        // A journal of a server shut down moments ago lets go of sled's lock once its
        // last actor has stopped.
        let mut attempts = 0;
        let journal = loop {
            match SledJournal::open_on(data_dir, log_storage.clone(), options) {
                Err(JournalError::Io(e)) if e.contains("lock") && attempts < 1_000 => {
                    attempts += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                other => break other?,
            }
        };
        let platform = Platform::open_embedded_on(
            data_dir,
            Some(OPERATOR_TOKEN),
            actors::limits::LIVE_ACTORS_MAX_DEFAULT,
            EmbeddedStorage::all_in(journal),
            Arc::new(actors::SystemClock),
        )
        .await?;
        TestServer::serve(platform, data_dir).await
    }

    /// Creates the test hubs and the storefront [`TEST_STOREFRONT`], whose credential the
    /// checkout client then calls with.
    pub async fn add_fixtures(&mut self) {
        create_test_hubs(&self.channel).await;
        self.storefront_credential =
            storefront_credential(std::slice::from_ref(&self.channel), OPERATOR_TOKEN, TEST_STOREFRONT)
                .await
                .unwrap();
    }

    /// `platform` served over `temporary`, with the test hubs and the storefront `test-web`.
    async fn with_fixtures(platform: Platform, temporary: tempfile::TempDir) -> TestServer {
        let mut server = TestServer::serve(platform, temporary.path()).await.unwrap();
        server.dir._temporary = Some(temporary);
        server.add_fixtures().await;
        server
    }

    /// Serves `platform`, whose data is in `data_dir`, on 127.0.0.1:0.
    async fn serve(platform: Platform, data_dir: &Path) -> anyhow::Result<TestServer> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let http_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let http_addr = http_listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // As `dropline serve` wires them: the HTTP side mirrors the gRPC health and stops
        // when the platform begins shutting down.
        let health = services::server::Health::new();
        let mut shutting_down = platform.shutdown.clone();
        let http = services::http::serve(
            http_listener,
            platform.clone(),
            health.clone(),
            services::extra_routes(&platform, Default::default()),
            None,
            async move {
                let _ = shutting_down.wait_for(|stopping| *stopping).await;
            },
        );
        let grpc = services::server::serve_with_options(
            platform.clone(),
            listener,
            async {
                let _ = stopped.await;
            },
            services::server::ServeOptions {
                health: Some(health),
                ..Default::default()
            },
        );
        let stopping = platform.clone();
        let task = tokio::spawn(async move {
            let http = tokio::spawn(http);
            let grpc = grpc.await;
            // Stopped without a shutdown (a failure): the HTTP side stops too.
            stopping.begin_shutdown();
            let http = http.await.map_err(anyhow::Error::from).and_then(|served| served);
            grpc.and(http)
        });
        Ok(TestServer {
            addr,
            http_addr,
            platform,
            channel: connect_when_serving(addr, std::time::Duration::from_secs(60), || Ok(None)).await?,
            stop: Some(stop),
            task: Some(task),
            dir: DataDir {
                path: data_dir.to_path_buf(),
                _temporary: None,
            },
            storefront_credential: String::new(),
        })
    }

    /// CheckoutService as the storefront `test-web`.
    pub fn checkout(&self) -> CheckoutServiceClient<Authed> {
        CheckoutServiceClient::with_interceptor(self.channel.clone(), Bearer::new(&self.storefront_credential).unwrap())
    }

    /// CheckoutService with another credential (an order token, another storefront's).
    pub fn checkout_as(&self, credential: &str) -> CheckoutServiceClient<Authed> {
        CheckoutServiceClient::with_interceptor(self.channel.clone(), Bearer::new(credential).unwrap())
    }

    /// CheckoutService with no credential at all.
    pub fn anonymous_checkout(&self) -> CheckoutServiceClient<Channel> {
        CheckoutServiceClient::new(self.channel.clone())
    }

    pub fn operator(&self) -> OperatorServiceClient<Authed> {
        operator_client(&self.channel)
    }

    pub fn registry(&self) -> PartnerRegistryServiceClient<Authed> {
        registry_client(&self.channel)
    }

    /// The operator's view of a drop (GetDrop), which must exist.
    pub async fn drop_figures(&self, drop_id: &str) -> Drop {
        self.operator()
            .get_drop(GetDropRequest {
                drop_id: drop_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// Stops serving, drains, and fails if the server failed.
    pub async fn shut_down(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let served = match self.task.take() {
            Some(task) => task.await?,
            None => Ok(()),
        };
        // Before the data directory may go (a temporary one goes with this server).
        self.platform.close().await;
        served
    }

    pub async fn stop(self) {
        self.shut_down().await.unwrap();
    }
}
