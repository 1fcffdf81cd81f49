//! The server's health services and its shutdown as Kubernetes sees them: readiness ("")
//! NOT_SERVING from the shutdown signal on, `liveness` SERVING until the end, calls still
//! answered during the shutdown delay, then the drain.

use proto::checkout::v1::checkout_service_client::CheckoutServiceClient;
use proto::checkout::v1::GetAvailabilityRequest;
use std::time::{Duration, Instant};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

async fn status(channel: &tonic::transport::Channel, service: &str) -> ServingStatus {
    let reply = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health answers");
    ServingStatus::try_from(reply.into_inner().status).unwrap()
}

#[tokio::test]
async fn readiness_goes_first_liveness_stays_and_calls_are_served_through_the_shutdown_delay() {
    let dir = tempfile::tempdir().unwrap();
    let platform = services::platform::Platform::open_embedded(
        dir.path(),
        Some(testkit::OPERATOR_TOKEN),
        actors::limits::LIVE_ACTORS_MAX_DEFAULT,
    )
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let delay = Duration::from_millis(4_000);
    let server = tokio::spawn(services::server::serve_with(
        platform,
        listener,
        async {
            let _ = stopped.await;
        },
        delay,
    ));
    let channel = testkit::connect(addr).await;
    assert_eq!(status(&channel, "").await, ServingStatus::Serving);
    assert_eq!(status(&channel, "liveness").await, ServingStatus::Serving);

    let signalled = Instant::now();
    stop.send(()).unwrap();
    let mut not_ready = None;
    while signalled.elapsed() < Duration::from_millis(2_000) {
        if status(&channel, "").await == ServingStatus::NotServing {
            not_ready = Some(signalled.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(not_ready.is_some(), "readiness still SERVING 2 s after the signal");
    assert_eq!(status(&channel, "liveness").await, ServingStatus::Serving);
    // Within the delay the services still answer (here: a real NOT_FOUND from checkout).
    let answer = CheckoutServiceClient::new(channel.clone())
        .get_availability(GetAvailabilityRequest {
            drop_id: "no-such-drop".into(),
            city: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(answer.code(), tonic::Code::NotFound, "{answer:?}");
    assert!(signalled.elapsed() < delay, "the checks above outlasted the delay");

    server.await.unwrap().unwrap();
    let stopped_after = signalled.elapsed();
    assert!(
        stopped_after >= delay,
        "stopped after {stopped_after:?}, before the {delay:?} delay"
    );
    assert!(
        stopped_after < delay + Duration::from_secs(10),
        "stopped after {stopped_after:?}"
    );
}

/// A node still waiting for NATS has its port bound (a taken port stops it at once) and
/// stops cleanly on SIGTERM, rather than ignoring it until the kubelet's SIGKILL.
#[tokio::test]
async fn a_node_still_opening_holds_its_port_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let nowhere = testkit::free_port(); // no NATS server listens there
    let mut child = testkit::ServeCommand::new(dir.path())
        .unwrap()
        .args(["--nats", &format!("nats://127.0.0.1:{nowhere}"), "--node", "n1"])
        .spawn()
        .unwrap();
    let port = child.port();
    let until = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "the node exited while opening");
        assert!(Instant::now() < until, "the port was never bound");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Bound but not serving: a health check gets no answer.
    assert!(!testkit::serving(([127, 0, 0, 1], port).into()).await);
    let signalled = Instant::now();
    child.sigterm().unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if signalled.elapsed() > Duration::from_secs(20) {
            child.kill();
            panic!("still running 20 s after SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
}
