//! The real server over TLS, with certificates made for the test (a CA, the server's, and
//! partners' client certificates): health, operator and settlement calls from the command
//! line's clients with `--tls-ca`; a partner presenting a certificate issued to its own id is
//! served, one presenting another's is PERMISSION_DENIED, one presenting none is served;
//! plaintext clients and certificates of another CA do not get in; a pop-up edge uploads
//! over TLS and refuses a platform whose certificate its CA did not sign.

use client::cli::{SettlementArgs, SettlementCommand};
use client::tls::ClientTlsArgs;
use proto::dispatch::v1::SubscribeRequest;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use services::server::ServeOptions;
use services::tls::TlsFiles;
use std::path::{Path, PathBuf};
use std::time::Duration;
use testkit::*;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

/// A certificate and its key, as PEM.
struct Pem {
    cert: String,
    key: String,
}

/// A test CA that issues server and client certificates.
struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        TestCa {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf with subject CN `common_name` and the DNS SANs `names`.
    fn issue(&self, common_name: &str, names: &[&str]) -> Pem {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, common_name);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A temporary directory, a test CA, the server's certificate for `localhost` (and, with
/// `partners_ca`, the same CA for partners' client certificates), an embedded platform and
/// a listener on a free port.
struct TlsSetup {
    dir: tempfile::TempDir,
    ca: TestCa,
    files: TlsFiles,
    platform: services::platform::Platform,
    listener: tokio::net::TcpListener,
    port: u16,
}

async fn tls_setup(partners_ca: bool) -> TlsSetup {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("dropline test CA");
    let server_pem = ca.issue("dropline", &["localhost"]);
    let files = TlsFiles {
        cert: write(dir.path(), "server.crt", &server_pem.cert),
        key: write(dir.path(), "server.key", &server_pem.key),
        client_ca: partners_ca.then(|| write(dir.path(), "partners-ca.crt", &ca.pem())),
    };
    let platform = services::platform::Platform::open_embedded(
        &dir.path().join("data"),
        Some(OPERATOR_TOKEN),
        actors::limits::LIVE_ACTORS_MAX_DEFAULT,
    )
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    TlsSetup {
        dir,
        ca,
        files,
        platform,
        listener,
        port,
    }
}

/// A TLS channel to the server at 127.0.0.1:`port`, whose certificate names `localhost`,
/// presenting `identity` if given.
async fn tls_channel(port: u16, ca: &str, identity: Option<&Pem>) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some(pem) = identity {
        tls = tls.identity(Identity::from_pem(&pem.cert, &pem.key));
    }
    Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_partners_may_prove_themselves_with_a_certificate_of_their_own_id() {
    let TlsSetup {
        dir,
        ca,
        files,
        platform,
        listener,
        port,
    } = tls_setup(true).await;
    let ca_path = write(dir.path(), "ca.crt", &ca.pem());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let options = ServeOptions {
        tls: Some(files.load().unwrap()),
        ..ServeOptions::default()
    };
    let server = tokio::spawn(services::server::serve_with_options(
        platform,
        listener,
        async {
            let _ = stopped.await;
        },
        options,
    ));

    // `dropline health --server https://… --tls-ca … --tls-server-name localhost`.
    let client_tls = ClientTlsArgs {
        tls_ca: Some(ca_path.clone()),
        tls_server_name: Some("localhost".into()),
    };
    let url = format!("https://127.0.0.1:{port}");
    let mut health = None;
    for _ in 0..100 {
        health = client::health::status(&url, &client_tls, "", Duration::from_secs(2))
            .await
            .ok();
        if health.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        health,
        Some(tonic_health::pb::health_check_response::ServingStatus::Serving)
    );

    // The operator, with no client certificate, sets up a hub and a courier partner.
    let channel = tls_channel(port, &ca.pem(), None).await.unwrap();
    create_test_hubs(&channel).await;
    let credential = courier(&channel, "courier-1", "hub-1", 1).await;

    // The partner's own certificate (its id as CN) is accepted; so is one naming it only
    // as a DNS SAN; and a partner may still come without one.
    let own_cn = ca.issue("courier-1", &[]);
    let own_san = ca.issue("courier fleet", &["courier-1"]);
    for identity in [Some(&own_cn), Some(&own_san), None] {
        let channel = tls_channel(port, &ca.pem(), identity).await.unwrap();
        courier_client(&channel, &credential)
            .subscribe(SubscribeRequest {})
            .await
            .expect("the partner is served");
    }
    // Another party's certificate from the same CA: the credential alone does not get in.
    let someone_else = ca.issue("someone-else", &["someone-else"]);
    let channel = tls_channel(port, &ca.pem(), Some(&someone_else)).await.unwrap();
    let refused = courier_client(&channel, &credential)
        .subscribe(SubscribeRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("someone-else"), "{refused:?}");
    // The operator's calls do not look at certificates.
    registry_client(&channel)
        .get_partner(proto::registry::v1::GetPartnerRequest {
            partner_id: "courier-1".into(),
        })
        .await
        .expect("an operator call with a certificate");

    // A certificate from a CA the server does not trust fails the handshake.
    let stranger_ca = TestCa::new("another CA");
    let stranger = stranger_ca.issue("courier-1", &["courier-1"]);
    let handshake = match tls_channel(port, &ca.pem(), Some(&stranger)).await {
        Err(e) => Err(e.to_string()),
        Ok(channel) => courier_client(&channel, &credential)
            .subscribe(SubscribeRequest {})
            .await
            .map(|_| ())
            .map_err(|s| s.to_string()),
    };
    assert!(handshake.is_err(), "a certificate of another CA was accepted");
    // Nor does a plaintext client get an answer.
    let plain = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .timeout(Duration::from_secs(2))
        .connect()
        .await;
    if let Ok(plain) = plain {
        let answer = registry_client(&plain)
            .get_partner(proto::registry::v1::GetPartnerRequest {
                partner_id: "courier-1".into(),
            })
            .await;
        assert!(answer.is_err(), "a plaintext call was answered");
    }

    // `dropline settlement --server https://… --tls-ca … reconcile --dry-run`.
    client::settlement_cli::run(SettlementArgs {
        server: url,
        tls: client_tls,
        token: Some(OPERATOR_TOKEN.into()),
        command: SettlementCommand::Reconcile { dry_run: true },
    })
    .await
    .expect("the settlement CLI over TLS");

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[test]
fn tls_files_that_do_not_parse_or_match_are_refused_before_serving() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("dropline test CA");
    let one = ca.issue("dropline", &["localhost"]);
    let other = ca.issue("dropline", &["localhost"]);
    let files = |cert: &str, key: &str| TlsFiles {
        cert: write(dir.path(), "tls.crt", cert),
        key: write(dir.path(), "tls.key", key),
        client_ca: None,
    };
    assert!(files(&one.cert, &one.key).load().is_ok());
    let garbage = files("not a certificate", &one.key).load().unwrap_err().to_string();
    assert!(garbage.contains("tls.crt"), "{garbage}");
    let mismatched = files(&one.cert, &other.key).load();
    assert!(mismatched.is_err(), "a key of another certificate was accepted");
    let missing = TlsFiles {
        cert: dir.path().join("absent.crt"),
        key: dir.path().join("absent.key"),
        client_ca: None,
    };
    assert!(missing.load().unwrap_err().to_string().contains("absent.crt"));
}

/// An HTTP/1.1 GET of `path` over TLS to 127.0.0.1:`port`, trusting `ca` for `localhost`:
/// the answer's status line and body, or the error.
async fn https_get(port: u16, ca: &str, path: &str) -> anyhow::Result<String> {
    use rustls_pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls_pki_types::CertificateDer::from_pem_slice(ca.as_bytes())?)?;
    let config =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let mut stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(rustls_pki_types::ServerName::try_from("localhost")?, stream)
        .await?;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut answer = Vec::new();
    // The server closes without a TLS close_notify at times: what was read is the answer.
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_side_is_served_over_tls_with_the_grpc_sides_certificate() {
    let TlsSetup {
        dir: _dir,
        ca,
        files,
        platform,
        listener,
        port,
    } = tls_setup(false).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let health = services::server::Health::new();
    health
        .set(
            services::config::health_services::READY,
            tonic_health::ServingStatus::Serving,
        )
        .await;
    let served = tokio::spawn(services::http::serve(
        listener,
        platform,
        health,
        axum::Router::new(),
        Some(files.http_config().unwrap()),
        async {
            let _ = stopped.await;
        },
    ));

    let answer = https_get(port, &ca.pem(), "/metrics").await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("dropline_build_info"), "{answer}");
    let answer = https_get(port, &ca.pem(), "/readyz").await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Another CA's client does not trust it; a plaintext request gets no HTTP answer.
    let other = TestCa::new("another CA");
    assert!(https_get(port, &other.pem(), "/metrics").await.is_err());
    let (status, _) = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let _ = plain
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer)).await;
        (String::from_utf8_lossy(&answer).into_owned(), ())
    };
    assert!(!status.starts_with("HTTP/1.1 200"), "plaintext got an answer: {status}");
    let _ = stop.send(());
    served.await.unwrap().unwrap();
}

/// A pop-up edge reaches a platform served over TLS with `--tls-ca`, and sells and uploads
/// through it; an edge trusting another CA (a platform impersonated) never gets online and
/// says why, while its till still sells its lease offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pop_up_edge_uploads_over_tls_and_refuses_a_platform_of_another_ca() {
    use proto::checkout::v1::checkout_service_client::CheckoutServiceClient;
    use proto::checkout::v1::{confirm_request, ConfirmRequest, Pickup, ReserveOutcome, ReserveRequest};
    use proto::edge::v1::popup_service_client::PopupServiceClient;
    use proto::edge::v1::{GetPopupStatusRequest, PopupStatus};
    use services::auth::Bearer;

    let TlsSetup {
        dir,
        ca,
        files,
        platform,
        listener,
        port,
    } = tls_setup(false).await;
    let ca_path = write(dir.path(), "ca.crt", &ca.pem());
    let stranger_path = write(dir.path(), "stranger.crt", &TestCa::new("another CA").pem());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(services::server::serve_with_options(
        platform,
        listener,
        async {
            let _ = stopped.await;
        },
        ServeOptions {
            tls: Some(files.load().unwrap()),
            ..ServeOptions::default()
        },
    ));
    let mut channel = None;
    for _ in 0..100 {
        if let Ok(c) = tls_channel(port, &ca.pem(), None).await {
            channel = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let channel = channel.expect("the TLS server answers");
    create_test_hubs(&channel).await;
    creator(&channel, "creator-1").await;
    let mut operator = operator_client(&channel);
    operator
        .create_drop(drop_request("stall", &[("tee", 10)], 5, 600))
        .await
        .unwrap();
    operator
        .open_drop(proto::operator::v1::OpenDropRequest {
            drop_id: "stall".into(),
        })
        .await
        .unwrap();
    let credential = storefront_credential(std::slice::from_ref(&channel), OPERATOR_TOKEN, "popup-tls")
        .await
        .unwrap();
    operator
        .lease_stock(proto::operator::v1::LeaseStockRequest {
            drop_id: "stall".into(),
            sku_id: "tee".into(),
            hub_id: "hub-1".into(),
            edge_id: "popup-tls".into(),
            quantity: 4,
            top_up_max: 0,
            key_id: "tls-1".into(),
            expires_at: Some(ts(3_600)),
            reconcile_window_seconds: 600,
        })
        .await
        .unwrap();

    let status = |edge: &Channel| PopupServiceClient::with_interceptor(edge.clone(), Bearer::new(&credential).unwrap());
    let until = |edge: Channel, done: fn(&PopupStatus) -> bool| {
        let mut client = status(&edge);
        async move {
            for _ in 0..600 {
                let now = client.get_status(GetPopupStatusRequest {}).await.unwrap().into_inner();
                if done(&now) {
                    return now;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("the edge did not get there in 30 s");
        }
    };
    let url = format!("https://127.0.0.1:{port}");
    let edge_with = |name: &str, ca: &Path| {
        EdgeCommand::new(&url, &credential, "stall", dir.path().join(name))
            .unwrap()
            .args([
                "--sync-secs",
                "1",
                "--offline-after-ms",
                "1000",
                "--tls-server-name",
                "localhost",
                "--tls-ca",
            ])
            .args([ca.as_os_str()])
    };

    // The edge trusting the platform's CA: online, and its sale is booked.
    let mut edge = edge_with("edge", &ca_path).spawn().unwrap();
    let edge_channel = edge.connect(Duration::from_secs(60)).await.unwrap();
    until(edge_channel.clone(), |s| s.online && s.tills.len() == 1).await;
    let mut till = CheckoutServiceClient::with_interceptor(edge_channel.clone(), Bearer::new(&credential).unwrap());
    let held = till
        .reserve(ReserveRequest {
            drop_id: "stall".into(),
            sku_id: "tee".into(),
            quantity: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(held.outcome, ReserveOutcome::Held as i32);
    till.confirm(ConfirmRequest {
        order_id: held.order_id,
        payment_reference: "card-1".into(),
        amount: eur(2_500),
        fulfilment: Some(confirm_request::Fulfilment::Pickup(Pickup {})),
        discreet: false,
    })
    .await
    .unwrap();
    until(edge_channel, |s| s.tills[0].sales_booked == 1).await;
    edge.kill();

    // Trusting another CA: the handshake fails, the edge never gets its lease or goes online.
    let mut impostor = edge_with("edge-2", &stranger_path).spawn().unwrap();
    let impostor_channel = impostor.connect(Duration::from_secs(60)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seen = status(&impostor_channel)
        .get_status(GetPopupStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!seen.online && seen.tills.is_empty(), "{seen:#?}");
    // "ListLeases: invalid peer certificate: UnknownIssuer"
    assert!(seen.offline_reason.contains("certificate"), "{seen:#?}");
    impostor.kill();

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
