//! The Dropline server: gRPC checkout, operator, registry, dispatch and settlement APIs over
//! the actor platform, the HTTP side (metrics, health, the operator and creator web consoles
//! of `console`), telemetry, the wiring of the embedded and cluster platforms, and
//! `dropline serve` ([`serve`]; the `dropline` binary itself is the `client` crate's). Only
//! this crate (and `proto`) knows protobuf.

pub mod auth;
pub mod checkout;
pub mod config;
pub mod console;
pub mod convert;
pub mod dispatch;
pub mod edge;
pub mod http;
pub mod levels;
pub mod limits;
pub mod metadata_bounds;
pub mod operator;
pub mod platform;
pub mod popup;
pub mod reconcile;
pub mod refunds;
pub mod registry;
pub mod reserve_stream;
pub mod server;
pub mod settlement;
pub mod status;
pub mod telemetry;
pub mod throttle;
pub mod tls;

use config::{ServeArgs, ServeConfig};
use tokio::net::TcpListener;
use tracing::{info, warn};

/// Runs `dropline serve` until SIGTERM or Ctrl-C.
pub async fn run_serve(config: ServeConfig) -> anyhow::Result<()> {
    // The port first: a node whose address is taken stops at once, before it waits for
    // JetStream and takes partition leases it could not serve. Connections that arrive
    // meanwhile wait in the backlog until the platform is open.
    // The TLS files before anything else: a bad one is a configuration error, not a
    // failure of every handshake later.
    let tls = config.tls.as_ref().map(tls::TlsFiles::load).transpose()?;
    let http_tls = config.tls.as_ref().map(tls::TlsFiles::http_config).transpose()?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("binding {}: {e}", config.listen))?;
    let http_listener = TcpListener::bind(config.http_listen)
        .await
        .map_err(|e| anyhow::anyhow!("binding {} (--http-listen): {e}", config.http_listen))?;
    // SIGTERM is heard from here on: opening can wait up to a minute for JetStream, and as
    // PID 1 in a container the process would otherwise ignore it until SIGKILL.
    let mut shutdown = Box::pin(server::shutdown_signal());
    let open = async {
        match &config.cluster {
            Some(cluster) => platform::Platform::open_cluster(cluster, config.operator_token.as_deref()).await,
            None => {
                platform::Platform::open_embedded_with(
                    &config.data_dir,
                    config.operator_token.as_deref(),
                    config.live_actors_max,
                    actors::sled_journal::JournalOptions {
                        segment_bytes: config.journal_segment_bytes,
                        ..Default::default()
                    },
                )
                .await
            }
        }
    };
    let mut platform = tokio::select! {
        platform = open => platform?,
        () = &mut shutdown => {
            info!("stopped while opening the platform");
            return Ok(());
        }
    };
    platform.metrics = std::sync::Arc::new(telemetry::Metrics::new(config.telemetry == telemetry::Telemetry::On));
    platform.throttle = std::sync::Arc::new(throttle::CheckoutThrottle::new(
        config.storefront_calls_per_sec,
        config.buyer_reserves_per_sec,
        config.buyer_reserve_burst,
    ));
    if let Some(token) = &platform.new_operator_token {
        // Shown once: only its hash is kept.
        eprintln!(
            "\nA new operator credential was created (shown once; only its hash is stored):\n\n    {token}\n\n\
             Send it as `authorization: Bearer <credential>` on operator and registry calls.\n"
        );
    }
    match &config.cluster {
        Some(cluster) => {
            info!(node = %cluster.node, nats = %cluster.nats_url, data_dir = %config.data_dir.display(), "cluster node ready")
        }
        None => info!(data_dir = %config.data_dir.display(), "embedded platform ready"),
    }
    let cluster = platform.cluster.clone();
    let health = server::Health::new();
    // The HTTP side stops taking connections when the platform begins shutting down: after
    // readiness turned NOT_SERVING (which `/readyz` shows) and the shutdown delay.
    let http_stopping = {
        let mut shutdown = platform.shutdown.clone();
        async move {
            let _ = shutdown.wait_for(|stopping| *stopping).await;
        }
    };
    let http = tokio::spawn(http::serve(
        http_listener,
        platform.clone(),
        health.clone(),
        extra_routes(
            &platform,
            console::ConsoleSettings::new(http_tls.is_some(), config.console_origin.clone()),
        ),
        http_tls,
        http_stopping,
    ));
    let options = server::ServeOptions {
        shutdown_delay: config.shutdown_delay,
        tls,
        health: Some(health),
    };
    let stopping = platform.clone();
    let served = server::serve_with_options(platform, listener, shutdown, options).await;
    // Stopped without a shutdown (a failure): the HTTP side stops too.
    stopping.begin_shutdown();
    match http.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %format!("{e:#}"), "the HTTP side failed"),
        Err(e) => warn!(error = %e, "the HTTP side stopped abnormally"),
    }
    if let Some(node) = cluster {
        // Hand this node's partitions over now rather than after the lease TTL.
        node.leave().await;
    }
    // Queued writes answered, the embedded log checkpointed: the next start replays nothing.
    stopping.close().await;
    served
}

/// The routes the HTTP side serves beside `/metrics`, `/healthz` and `/readyz` (the
/// consoles), for `dropline serve` and the test kit's servers alike.
pub fn extra_routes(platform: &platform::Platform, settings: console::ConsoleSettings) -> axum::Router {
    console::routes(platform.clone(), settings)
}

/// Logs of the command line's clients (demo, settlement) on standard error, as text.
pub fn init_tracing(filter: &str) {
    telemetry::logging::init_plain(filter);
}

/// `dropline serve` on the runtime `main` built with `scheduler`: with `--check-config`,
/// prints the settings and returns; else serves until SIGTERM or Ctrl-C.
pub async fn serve(args: ServeArgs, scheduler: actors::runtime::Scheduler) -> anyhow::Result<()> {
    let scheduler_falls_back = scheduler == actors::runtime::Scheduler::LifoSlotFallback;
    let scheduler = scheduler.describe();
    let config = args.resolve()?;
    if args.check_config {
        if let Some(files) = &config.tls {
            files.load()?;
            files.http_config()?;
        }
        print_config(&config);
        println!("# scheduler: {scheduler}");
        return Ok(());
    }
    let _tracing = telemetry::logging::init(&config.log, config.log_format, config.otlp_endpoint.as_deref())?;
    if scheduler_falls_back {
        warn!(scheduler, "runtime started on tokio's default scheduler");
    } else {
        info!(scheduler, "runtime started");
    }
    run_serve(config).await
}

/// `dropline serve --check-config`: the settings a server would run with (no credential).
fn print_config(config: &ServeConfig) {
    println!("listen = \"{}\"", config.listen);
    println!("http_listen = \"{}\"", config.http_listen);
    println!("data_dir = {:?}", config.data_dir.display().to_string());
    println!("log = {:?}", config.log);
    println!("log_format = \"{}\"", config.log_format);
    match &config.otlp_endpoint {
        Some(endpoint) => println!("otlp_endpoint = {endpoint:?}"),
        None => println!("# no trace export (no otlp_endpoint)"),
    }
    match &config.console_origin {
        Some(origin) => println!("console_origin = {origin:?}"),
        None => println!("# consoles: forms from the request's own host (no console_origin)"),
    }
    println!("shutdown_delay_ms = {}", config.shutdown_delay.as_millis());
    println!("live_actors_max = {}", config.live_actors_max);
    println!("storefront_calls_per_sec = {}", config.storefront_calls_per_sec);
    println!("buyer_reserves_per_sec = {}", config.buyer_reserves_per_sec);
    println!("buyer_reserve_burst = {}", config.buyer_reserve_burst);
    println!(
        "operator_token = {}",
        if config.operator_token.is_some() {
            "\"(set)\""
        } else {
            "\"(none)\""
        }
    );
    match &config.tls {
        None => println!("# plaintext (no tls_cert / tls_key)"),
        Some(tls) => {
            println!("tls_cert = {:?}", tls.cert.display().to_string());
            println!("tls_key = {:?}", tls.key.display().to_string());
            match &tls.client_ca {
                Some(ca) => println!("tls_client_ca = {:?}", ca.display().to_string()),
                None => println!("# no client certificates (no tls_client_ca)"),
            }
        }
    }
    match &config.cluster {
        None => println!("# embedded platform (no nats)"),
        Some(c) => {
            println!("nats = {:?}", c.nats_url);
            println!("node = {:?}", c.node);
            println!("partitions = {}", c.partitions);
            println!("replicas = {}", c.replicas);
            println!("lease_ttl_ms = {}", c.timings.ttl.as_millis());
            println!("lease_renew_ms = {}", c.timings.renew.as_millis());
        }
    }
}
