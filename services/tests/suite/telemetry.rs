//! The HTTP side and telemetry of a real `dropline serve`: `/metrics` after reserves (values
//! checked against what was done), request ids both ways, JSON log lines carrying them, no
//! colour codes in a log written to a file, and hostile HTTP answered with a 4xx.

use proto::checkout::v1::{ReserveRequest, ReserveResponse};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `request` (raw bytes) to `addr` and returns the status code and body of the
/// answer (the connection is read until the server closes it or 5 s pass).
async fn http_raw(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    // A server may answer and close before reading everything sent: that is an answer too.
    let _ = stream.write_all(request).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {answer:?}"));
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body).to_string();
    (status, body)
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: dropline\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
}

/// `dropline serve` logging at `log` in `format` to `log_file`, and a channel to it.
async fn serve(dir: &Path, log_file: &Path, format: &str) -> (ServeProcess, tonic::transport::Channel) {
    let mut server = ServeCommand::new(dir.join("data"))
        .unwrap()
        .log_filter("info,services::rpc=debug")
        .log_to(log_file)
        .args(["--log-format", format])
        .spawn()
        .expect("dropline binary starts");
    let channel = server.connect(Duration::from_secs(60)).await.unwrap();
    (server, channel)
}

fn reserve_with_id(request: ReserveRequest, request_id: &str) -> tonic::Request<ReserveRequest> {
    let mut request = tonic::Request::new(request);
    request
        .metadata_mut()
        .insert("x-request-id", request_id.parse().unwrap());
    request
}

fn request_id_of(response: &tonic::Response<ReserveResponse>) -> String {
    response
        .metadata()
        .get("x-request-id")
        .expect("every answer carries a request id")
        .to_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_was_done_and_request_ids_reach_the_json_log() {
    let dir = tempfile::tempdir().unwrap();
    let log_file = dir.path().join("serve.log");
    let (mut server, channel) = serve(dir.path(), &log_file, "json").await;
    create_test_hubs(&channel).await;
    let mut operator = operator_client(&channel);
    operator
        .create_drop(drop_request("m", &[("sku", 5)], 1, 600))
        .await
        .unwrap();
    operator
        .open_drop(proto::operator::v1::OpenDropRequest { drop_id: "m".into() })
        .await
        .unwrap();
    let mut checkout = storefront_client(&channel).await;

    // Five buyers are held, a sixth finds only held stock, one asks for a SKU that does not
    // exist; the first carries its own request id.
    let first = checkout
        .reserve(reserve_with_id(reserve("m", "sku", "b0", 1), "test-request-42"))
        .await
        .unwrap();
    assert_eq!(request_id_of(&first), "test-request-42", "the client's id comes back");
    for buyer in 1..6 {
        let answer = checkout
            .reserve(reserve("m", "sku", &format!("b{buyer}"), 1))
            .await
            .unwrap();
        let made = request_id_of(&answer);
        assert!(
            made.len() == 16 && made.bytes().all(|b| b.is_ascii_hexdigit()),
            "{made}"
        );
    }
    let unknown = checkout.reserve(reserve("m", "nope", "b9", 1)).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    // A refusal carries the id too (in its trailers-only headers); an unusable one is
    // replaced.
    let refused = checkout
        .reserve(reserve_with_id(reserve("m", "nope", "b8", 1), "not a usable id!"))
        .await
        .unwrap_err();
    let replaced = refused
        .metadata()
        .get("x-request-id")
        .expect("a request id")
        .to_str()
        .unwrap();
    assert_eq!(replaced.len(), 16, "{replaced}");

    let (status, text) = http_get(server.http_addr, "/metrics").await;
    assert_eq!(status, 200, "{text}");
    let samples = services::telemetry::metrics::parse_samples(&text);
    let value = |name: &str| {
        samples
            .get(name)
            .copied()
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    assert_eq!(value(r#"dropline_reserves_total{outcome="held"}"#), 5.0);
    assert_eq!(
        value(r#"dropline_reserves_total{outcome="waitlisted"}"#)
            + value(r#"dropline_reserves_total{outcome="sold_out"}"#),
        1.0
    );
    assert_eq!(value(r#"dropline_reserves_total{outcome="refused"}"#), 2.0);
    assert_eq!(value(r#"dropline_reserves_total{outcome="partial"}"#), 0.0);
    let reserve_calls = |code: &str| {
        value(&format!(
            r#"dropline_grpc_server_handled_total{{service="dropline.checkout.v1.CheckoutService",method="Reserve",code="{code}"}}"#
        ))
    };
    assert_eq!(reserve_calls("OK"), 6.0);
    assert_eq!(reserve_calls("NOT_FOUND"), 2.0);
    assert_eq!(
        value(
            r#"dropline_grpc_server_handling_seconds_count{service="dropline.checkout.v1.CheckoutService",method="Reserve"}"#
        ),
        8.0
    );
    assert_eq!(value(r#"dropline_stock_units{hub="hub-1",state="held"}"#), 5.0);
    assert_eq!(value(r#"dropline_stock_units{hub="hub-1",state="allocated"}"#), 5.0);
    assert!(value(r#"dropline_journal_appends_per_write_count{journal="log"}"#) >= 1.0);
    assert!(value(r#"dropline_journal_syncs_total{journal="log"}"#) >= 1.0);
    assert!(value(r#"dropline_actors_running{kind="sku"}"#) >= 1.0);
    assert!(text.contains("# TYPE dropline_journal_write_seconds histogram"));
    assert!(
        !text.contains("\"b0\"") && !text.contains("m.sku."),
        "no buyer or order in a label"
    );

    let (status, body) = http_get(server.http_addr, "/readyz").await;
    assert_eq!((status, body.as_str()), (200, "readiness: SERVING\n"));
    assert_eq!(http_get(server.http_addr, "/healthz").await.0, 200);

    // Every line is a JSON object; the call's "rpc finished" line carries its request id.
    server.terminate(Duration::from_secs(15));
    let log = std::fs::read_to_string(&log_file).unwrap();
    assert!(!log.contains('\u{1b}'), "no colour codes in a log file");
    let mut found = false;
    for line in log.lines().filter(|l| !l.is_empty()) {
        let line: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        // The event's own span, or one it is in.
        let in_request = line["span"]["request_id"] == "test-request-42"
            || line["spans"]
                .as_array()
                .is_some_and(|spans| spans.iter().any(|s| s["request_id"] == "test-request-42"));
        if in_request && line["fields"]["message"] == "rpc finished" {
            assert_eq!(line["fields"]["code"], "OK");
            assert_eq!(line["target"], "services::rpc");
            found = true;
        }
    }
    assert!(
        found,
        "no log line of the call with request id test-request-42 in\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_http_gets_a_4xx_and_a_log_file_has_no_colour() {
    let dir = tempfile::tempdir().unwrap();
    let log_file = dir.path().join("serve.log");
    let (mut server, channel) = serve(dir.path(), &log_file, "text").await;
    create_test_hubs(&channel).await;
    let http = server.http_addr;

    // A 100 KB header, too many headers, garbage, a huge body: each a 4xx, nothing served.
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nHost: dropline\r\nX-Junk: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    assert_eq!(http_raw(http, huge.as_bytes()).await.0, 431);
    let many: String = (0..200).map(|i| format!("X-Field-{i}: {i}\r\n")).collect();
    let many = format!("GET /metrics HTTP/1.1\r\nHost: dropline\r\n{many}\r\n");
    assert_eq!(http_raw(http, many.as_bytes()).await.0, 431);
    assert_eq!(
        http_raw(http, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")
            .await
            .0,
        400
    );
    assert_eq!(http_raw(http, b"GET /metrics HTTP/9.9 nonsense\r\n\r\n").await.0, 400);
    let (status, _) = http_get(http, "/no-such-page").await;
    assert_eq!(status, 404);
    let (status, _) = http_raw(
        http,
        format!(
            "POST /metrics HTTP/1.1\r\nHost: dropline\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            10 * 1024 * 1024
        )
        .as_bytes(),
    )
    .await;
    assert!((400..500).contains(&status), "{status}");

    // The server is unharmed: it still serves both sides.
    let (status, text) = http_get(http, "/metrics").await;
    assert_eq!(status, 200);
    assert!(text.contains("dropline_build_info"));
    let mut operator = operator_client(&channel);
    operator
        .create_drop(drop_request("h", &[("sku", 1)], 1, 600))
        .await
        .unwrap();

    server.terminate(Duration::from_secs(15));
    let log = std::fs::read_to_string(&log_file).unwrap();
    assert!(log.contains("rpc finished"), "the calls were logged:\n{log}");
    assert!(
        !log.contains('\u{1b}'),
        "a log written to a file has no colour codes:\n{log}"
    );
}
