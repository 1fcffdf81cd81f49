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

/// An OTLP/gRPC trace collector on loopback, handing every export to the test.
struct Collector(
    tokio::sync::mpsc::Sender<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest>,
);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest>,
    ) -> Result<
        tonic::Response<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse>,
        tonic::Status,
    > {
        let _ = self.0.try_send(request.into_inner());
        Ok(tonic::Response::new(Default::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_is_exported_as_a_trace_through_the_actor_command_and_the_journal_append() {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = listener.local_addr().unwrap();
    let (exports, mut exported) = tokio::sync::mpsc::channel(1_024);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(exports)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServeCommand::new(dir.path().join("data"))
        .unwrap()
        .args(["--otlp-endpoint", &format!("http://{collector_addr}")])
        .spawn()
        .expect("dropline binary starts");
    let channel = server.connect(Duration::from_secs(60)).await.unwrap();
    create_test_hubs(&channel).await;
    let mut operator = operator_client(&channel);
    operator
        .create_drop(drop_request("t", &[("sku", 5)], 1, 600))
        .await
        .unwrap();
    operator
        .open_drop(proto::operator::v1::OpenDropRequest { drop_id: "t".into() })
        .await
        .unwrap();
    let mut checkout = storefront_client(&channel).await;
    checkout
        .reserve(reserve_with_id(reserve("t", "sku", "b1", 1), "trace-me-7"))
        .await
        .unwrap();
    // The exporter sends what it holds when the server stops.
    server.terminate(Duration::from_secs(15));
    let mut spans = Vec::new();
    while let Ok(Some(export)) = tokio::time::timeout(Duration::from_secs(2), exported.recv()).await {
        for resource in export.resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
    }
    let attribute = |span: &opentelemetry_proto::tonic::trace::v1::Span, key: &str| {
        span.attributes
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| a.value.as_ref()?.value.clone())
    };
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    let call = spans
        .iter()
        .find(|s| {
            s.name == "dropline.checkout.v1.CheckoutService/Reserve"
                && attribute(s, "request_id") == Some(Value::StringValue("trace-me-7".into()))
        })
        .unwrap_or_else(|| panic!("no Reserve span with the request id among {names:?}"));
    assert_eq!(attribute(call, "rpc.grpc.status_code"), Some(Value::IntValue(0)));
    let command = spans
        .iter()
        .find(|s| s.name == "command" && s.parent_span_id == call.span_id)
        .unwrap_or_else(|| panic!("no command span under the call among {names:?}"));
    assert_eq!(command.trace_id, call.trace_id);
    assert_eq!(attribute(command, "kind"), Some(Value::StringValue("sku".into())));
    let append = spans
        .iter()
        .find(|s| s.name == "journal_append" && s.parent_span_id == command.span_id)
        .unwrap_or_else(|| panic!("no journal_append span under the command among {names:?}"));
    assert!(append.end_time_unix_nano >= append.start_time_unix_nano);
    assert!(
        call.end_time_unix_nano >= append.end_time_unix_nano,
        "the call ends after its append is durable"
    );
}
