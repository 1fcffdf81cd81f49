//! The web consoles over plain HTTP, as an attacker would try them: no session, another
//! role's session, another creator's pages, missing or replayed CSRF tokens, a foreign
//! Origin, huge bodies, garbage, the same POST twice, guessing credentials. Each gets a
//! clear status and changes nothing. Also the harness the browser tests share: a test
//! server with its consoles on 127.0.0.1:0 and a creator with a settled ledger.

use proto::checkout::v1::GetOrderRequest;
use proto::dispatch::v1::*;
use proto::operator::v1::*;
use proto::settlement::v1 as pb;
use services::console::{Console, ConsoleSettings};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A test server with its consoles served on 127.0.0.1:0.
pub struct ConsoleServer {
    pub server: TestServer,
    pub console: Console,
    pub http: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl ConsoleServer {
    pub async fn start() -> ConsoleServer {
        ConsoleServer::start_with(ConsoleSettings::default()).await
    }

    pub async fn start_with(settings: ConsoleSettings) -> ConsoleServer {
        let server = TestServer::start().await;
        let console = Console::new(server.platform.clone(), settings);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // The HTTP side as `dropline serve` runs it (its bounds, /metrics beside), with this
        // console, whose one-time links the tests make.
        tokio::spawn(services::http::serve(
            listener,
            server.platform.clone(),
            services::server::Health::new(),
            console.router(),
            None,
            async {
                let _ = stopped.await;
            },
        ));
        ConsoleServer {
            server,
            console,
            http,
            stop: Some(stop),
        }
    }

    pub fn origin(&self) -> String {
        format!("http://{}", self.http)
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.server.stop().await;
    }

    /// One HTTP/1.1 request (the connection closed after it).
    pub async fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
        let mut stream = tokio::net::TcpStream::connect(self.http).await.unwrap();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.http,
            body.len()
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(body).await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw))
            .await
            .expect("a reply within 30 s")
            .unwrap();
        Reply::parse(&raw)
    }

    pub async fn get(&self, path: &str, cookie: Option<&str>) -> Reply {
        let cookie = cookie.map(|c| format!("dropline-session={c}"));
        let headers: Vec<(&str, &str)> = cookie.iter().map(|c| ("Cookie", c.as_str())).collect();
        self.request("GET", path, &headers, b"").await
    }

    /// A form POST from this console's own page (its Origin), with the session's cookie.
    pub async fn post(&self, path: &str, cookie: Option<&str>, form: &[(&str, &str)]) -> Reply {
        self.post_from(path, cookie, form, Some(&self.origin())).await
    }

    pub async fn post_from(
        &self,
        path: &str,
        cookie: Option<&str>,
        form: &[(&str, &str)],
        origin: Option<&str>,
    ) -> Reply {
        let body = form_body(form);
        let cookie = cookie.map(|c| format!("dropline-session={c}"));
        let mut headers = vec![("Content-Type", "application/x-www-form-urlencoded")];
        if let Some(cookie) = &cookie {
            headers.push(("Cookie", cookie));
        }
        if let Some(origin) = origin {
            headers.push(("Origin", origin));
        }
        self.request("POST", path, &headers, body.as_bytes()).await
    }

    /// Signs in; returns the session id from the cookie.
    pub async fn sign_in(&self, credential: &str) -> String {
        let reply = self.post("/sign-in", None, &[("credential", credential)]).await;
        assert_eq!(reply.status, 303, "sign-in: {}", reply.body);
        reply.session().expect("a session cookie")
    }

    /// The CSRF token of a page's forms.
    pub async fn csrf(&self, cookie: &str) -> String {
        let page = self.get("/", Some(cookie)).await;
        let home = page.header("location").unwrap().to_string();
        let page = self.get(&home, Some(cookie)).await;
        page.hidden("csrf").expect("the sign-out form's CSRF token")
    }
}

pub fn form_body(form: &[(&str, &str)]) -> String {
    form.iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    fn parse(raw: &[u8]) -> Reply {
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a header block");
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
            .collect();
        let mut body = raw[split + 4..].to_vec();
        if headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
        {
            body = dechunk(&body);
        }
        Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&body).to_string(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The session id a Set-Cookie gave.
    pub fn session(&self) -> Option<String> {
        let cookie = self.header("set-cookie")?;
        let value = cookie.strip_prefix("dropline-session=")?.split(';').next()?;
        (!value.is_empty()).then(|| value.to_string())
    }

    /// The value of the first hidden input named `name`.
    pub fn hidden(&self, name: &str) -> Option<String> {
        let marker = format!("name=\"{name}\" value=\"");
        let start = self.body.find(&marker)? + marker.len();
        Some(self.body[start..].split('"').next()?.to_string())
    }
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = body.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(std::str::from_utf8(&body[..end]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&body[end + 2..end + 2 + size]);
        body = &body[end + 2 + size + 2..];
    }
}

/// A creator's drop, settled: three orders confirmed, one refunded before pickup ("damaged
/// at the hub"), two delivered, one of them returned ("wrong size"), the other's earnings
/// available once its 2-second return window ends. Returns the creator's credential.
pub async fn settled_creator(server: &TestServer, creator_id: &str, drop_id: &str) -> String {
    let credential = creator(&server.channel, creator_id).await;
    let partner = format!("courier-{creator_id}");
    let courier_token = courier(&server.channel, &partner, "hub-1", 1).await;
    let mut courier = courier_client(&server.channel, &courier_token);
    let mut offers = courier.subscribe(SubscribeRequest {}).await.unwrap().into_inner();
    let mut request = drop_request(drop_id, &[("tee", 50)], 5, 600);
    request.creator_id = creator_id.into();
    request.settlement = Some(SettlementTerms {
        platform_fee_bps: 1_000,
        delivery_fee_minor_units: 300,
        return_window_seconds: 2,
    });
    open_drop(server, request).await;
    let mut orders = Vec::new();
    for buyer in ["a", "b", "c"] {
        let confirmed = buy(server, drop_id, "tee", &format!("{creator_id}-{buyer}")).await;
        orders.push(confirmed.order.unwrap());
    }
    let mut ops = settlement(&server.channel, OPERATOR_TOKEN);
    ops.refund_order(pb::RefundOrderRequest {
        order_id: orders[1].order_id.clone(),
        reason: "damaged at the hub".into(),
    })
    .await
    .unwrap();
    let mut delivered = 0;
    while delivered < 2 {
        let offer = next_offer(&mut offers, Duration::from_secs(10)).await;
        let Some(order) = [&orders[0], &orders[2]]
            .into_iter()
            .find(|o| o.order_id == offer.order_id)
        else {
            continue;
        };
        courier
            .accept(AcceptRequest {
                dispatch_id: offer.dispatch_id.clone(),
            })
            .await
            .unwrap();
        pick_up(&mut courier, &offer.dispatch_id, &order.pickup_code).await;
        courier
            .mark_delivered(MarkDeliveredRequest {
                dispatch_id: offer.dispatch_id.clone(),
                proof_reference: "photo".into(),
            })
            .await
            .unwrap();
        delivered += 1;
    }
    // The courier leaves hub-1, so the next creator's orders are offered to its own.
    registry_client(&server.channel)
        .assign_partner(proto::registry::v1::AssignPartnerRequest {
            partner_id: partner.clone(),
            hub_id: "hub-1".into(),
            rank: 0,
        })
        .await
        .unwrap();
    // The return is booked once the ledger has the delivery.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match ops
            .record_return(pb::RecordReturnRequest {
                order_id: orders[0].order_id.clone(),
                reason: "wrong size".into(),
            })
            .await
        {
            Ok(_) => break,
            Err(status) => {
                assert!(Instant::now() < deadline, "return not recorded: {status:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let mut mine = settlement(&server.channel, &credential);
    loop {
        let balance = mine
            .get_balance(pb::GetBalanceRequest::default())
            .await
            .unwrap()
            .into_inner();
        if balance.currencies.iter().any(|c| c.available > 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "earnings never became available: {balance:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    credential
}

async fn drop_status(server: &TestServer, drop_id: &str) -> i32 {
    server.drop_figures(drop_id).await.status
}

#[tokio::test]
async fn a_wrong_credential_is_refused_alike_whatever_was_wrong_and_a_right_one_opens_a_strict_session() {
    let c = ConsoleServer::start().await;
    let partner = courier(&c.server.channel, "p1", "hub-1", 1).await;
    let storefront = c.server.storefront_credential.clone();
    let mut refusals = Vec::new();
    for wrong in [
        "wrong",
        "dlc_0000000000000000000000000000000000000000000000000000000000000000",
        partner.as_str(),
        storefront.as_str(),
        "",
    ] {
        let reply = c.post("/sign-in", None, &[("credential", wrong)]).await;
        assert_eq!(reply.status, 401, "{wrong}");
        assert!(reply.session().is_none());
        if !wrong.is_empty() {
            assert!(!reply.body.contains(wrong), "a refusal never echoes the credential");
        }
        refusals.push(reply.body);
    }
    assert!(
        refusals.windows(2).all(|w| w[0] == w[1]),
        "every refusal reads the same"
    );

    let ok = c.post("/sign-in", None, &[("credential", OPERATOR_TOKEN)]).await;
    assert_eq!(ok.status, 303);
    assert_eq!(ok.header("location"), Some("/operator"));
    let cookie = ok.header("set-cookie").unwrap();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    assert!(!cookie.contains("Secure"), "plain HTTP here: {cookie}");
    assert!(!cookie.contains(OPERATOR_TOKEN));
    let id = ok.session().unwrap();
    assert_eq!(id.len(), 64);
    let page = c.get("/operator", Some(&id)).await;
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-security-policy")
        .unwrap()
        .contains("script-src 'self'"));
    assert_eq!(page.header("cache-control"), Some("no-store"));
    // The credential appears in no page.
    assert!(!page.body.contains(OPERATOR_TOKEN));

    // Signing in from another site's page is refused before the credential is looked at.
    let foreign = c
        .post_from(
            "/sign-in",
            None,
            &[("credential", OPERATOR_TOKEN)],
            Some("http://evil.example"),
        )
        .await;
    assert_eq!(foreign.status, 403);
    assert!(foreign.session().is_none());
    let no_origin = c
        .post_from("/sign-in", None, &[("credential", OPERATOR_TOKEN)], None)
        .await;
    assert_eq!(no_origin.status, 403);
    c.stop().await;
}

#[tokio::test]
async fn sign_in_attempts_are_bounded_per_peer_even_for_the_right_credential() {
    let c = ConsoleServer::start().await;
    let mut refused_at = None;
    for attempt in 0..40 {
        let reply = c.post("/sign-in", None, &[("credential", "guess")]).await;
        if reply.status == 429 {
            assert!(reply.header("retry-after").is_some());
            refused_at = Some(attempt);
            break;
        }
        assert_eq!(reply.status, 401);
    }
    let refused_at = refused_at.expect("guessing is bounded");
    assert!(refused_at >= 5, "a few mistakes are allowed ({refused_at})");
    // Bounded before the credential is checked: the right one waits too.
    let reply = c.post("/sign-in", None, &[("credential", OPERATOR_TOKEN)]).await;
    assert_eq!(reply.status, 429);
    assert!(reply.session().is_none());
    c.stop().await;
}

#[tokio::test]
async fn pages_need_a_session_of_their_role_and_a_creator_reaches_only_its_own() {
    let c = ConsoleServer::start().await;
    open_drop(&c.server, drop_request("d1", &[("tee", 10)], 2, 60)).await;
    let ana = settled_creator(&c.server, "ana", "ana-drop").await;
    let bea = creator(&c.server.channel, "bea").await;

    // No session: pages go to sign-in, anything else is 401, nothing is shown.
    for path in [
        "/operator",
        "/operator/drops/d1",
        "/creators/ana",
        "/creators/ana/statement.csv",
    ] {
        let reply = c.get(path, None).await;
        assert_eq!(reply.status, 303, "{path}");
        assert_eq!(reply.header("location"), Some("/sign-in"));
    }
    let reply = c.get("/operator", Some(&"ab".repeat(32))).await;
    assert_eq!(reply.status, 303, "an unknown session is no session");
    assert!(reply.header("set-cookie").unwrap().contains("Max-Age=0"));
    let reply = c.post("/operator/drops/d1/close", None, &[("csrf", "x")]).await;
    assert_eq!(reply.status, 401);
    assert_eq!(drop_status(&c.server, "d1").await, DropStatus::Open as i32);

    let ana_session = c.sign_in(&ana).await;
    let bea_session = c.sign_in(&bea).await;
    let operator = c.sign_in(OPERATOR_TOKEN).await;

    // Ana's own pages.
    for path in [
        "/creators/ana",
        "/creators/ana/statement",
        "/creators/ana/payouts",
        "/creators/ana/returns",
    ] {
        let reply = c.get(path, Some(&ana_session)).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
    }
    let csv = c.get("/creators/ana/statement.csv", Some(&ana_session)).await;
    assert_eq!(csv.status, 200);
    assert!(csv.body.contains("ana-drop"));

    // Another creator's pages, and the operator's: refused, with none of the data.
    for path in [
        "/creators/ana",
        "/creators/ana/statement",
        "/creators/ana/statement.csv",
        "/creators/ana/payouts",
        "/creators/ana/returns",
        "/creators/ana/live",
        "/operator",
        "/operator/drops/d1",
        "/operator/hubs",
    ] {
        let reply = c.get(path, Some(&bea_session)).await;
        assert_eq!(reply.status, 403, "bea on {path}");
        assert!(
            !reply.body.contains("ana-drop") && !reply.body.contains("wrong size"),
            "{path}"
        );
    }
    // The operator has no creator pages (it reads ledgers over the API).
    let reply = c.get("/creators/ana", Some(&operator)).await;
    assert_eq!(reply.status, 403);
    // A creator's form posted to another creator's page changes nothing.
    let csrf = c.csrf(&bea_session).await;
    let reply = c
        .post(
            "/creators/ana/payouts",
            Some(&bea_session),
            &[
                ("csrf", &csrf),
                ("amount", "0.01"),
                ("currency", "EUR"),
                ("idempotency_key", "k1"),
            ],
        )
        .await;
    assert_eq!(reply.status, 403);
    let payouts = settlement(&c.server.channel, &ana)
        .list_payouts(pb::ListPayoutsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(payouts.payouts.is_empty());
    c.stop().await;
}

#[tokio::test]
async fn state_changes_need_this_session_s_csrf_token_and_this_console_s_origin() {
    let c = ConsoleServer::start().await;
    open_drop(&c.server, drop_request("d1", &[("tee", 10)], 2, 60)).await;
    let operator = c.sign_in(OPERATOR_TOKEN).await;
    let other = c.sign_in(OPERATOR_TOKEN).await;
    let csrf = c.csrf(&operator).await;
    let others_csrf = c.csrf(&other).await;
    assert_ne!(csrf, others_csrf, "each session has its own token");

    for (form, origin, status) in [
        (vec![], Some(c.origin()), 422),
        (vec![("csrf", "0".repeat(64))], Some(c.origin()), 403),
        (vec![("csrf", others_csrf.clone())], Some(c.origin()), 403),
        (
            vec![("csrf", csrf.clone())],
            Some("http://evil.example".to_string()),
            403,
        ),
        (vec![("csrf", csrf.clone())], None, 403),
    ] {
        let form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let reply = c
            .post_from("/operator/drops/d1/close", Some(&operator), &form, origin.as_deref())
            .await;
        assert_eq!(reply.status, status, "{form:?} from {origin:?}: {}", reply.body);
        assert_eq!(drop_status(&c.server, "d1").await, DropStatus::Open as i32);
    }
    // A GET never changes anything: the confirmation step.
    let confirm = c.get("/operator/drops/d1/close", Some(&operator)).await;
    assert_eq!(confirm.status, 200);
    assert_eq!(drop_status(&c.server, "d1").await, DropStatus::Open as i32);
    let reply = c
        .post("/operator/drops/d1/close", Some(&operator), &[("csrf", &csrf)])
        .await;
    assert_eq!(reply.status, 303, "{}", reply.body);
    assert_eq!(drop_status(&c.server, "d1").await, DropStatus::Closed as i32);

    // Sign-out needs the token too, and ends the session.
    let reply = c.post("/sign-out", Some(&operator), &[("csrf", "nope")]).await;
    assert_eq!(reply.status, 403);
    let reply = c.post("/sign-out", Some(&operator), &[("csrf", &csrf)]).await;
    assert_eq!(reply.status, 303);
    assert!(reply.header("set-cookie").unwrap().contains("Max-Age=0"));
    assert_eq!(c.get("/operator", Some(&operator)).await.status, 303);
    // A replayed form of the ended session is refused.
    let reply = c
        .post("/operator/drops/d1/open", Some(&operator), &[("csrf", &csrf)])
        .await;
    assert_eq!(reply.status, 401);
    c.stop().await;
}

#[tokio::test]
async fn the_same_restock_or_payout_form_sent_twice_takes_effect_once() {
    let c = ConsoleServer::start().await;
    open_drop(&c.server, drop_request("d1", &[("tee", 10)], 2, 60)).await;
    let operator = c.sign_in(OPERATOR_TOKEN).await;
    let page = c
        .get(
            "/operator/drops/d1/restock?sku_id=tee&hub_id=hub-1&quantity=5",
            Some(&operator),
        )
        .await;
    assert_eq!(page.status, 200, "{}", page.body);
    let csrf = page.hidden("csrf").unwrap();
    let key = page.hidden("idempotency_key").unwrap();
    let form = [
        ("csrf", csrf.as_str()),
        ("sku_id", "tee"),
        ("hub_id", "hub-1"),
        ("quantity", "5"),
        ("idempotency_key", key.as_str()),
    ];
    for _ in 0..2 {
        let reply = c.post("/operator/drops/d1/restock", Some(&operator), &form).await;
        assert_eq!(reply.status, 303, "{}", reply.body);
    }
    assert_eq!(c.server.drop_figures("d1").await.skus[0].allocated, 15);

    let ana = settled_creator(&c.server, "ana", "ana-drop").await;
    let session = c.sign_in(&ana).await;
    let page = c.get("/creators/ana/payouts", Some(&session)).await;
    let (csrf, key) = (page.hidden("csrf").unwrap(), page.hidden("idempotency_key").unwrap());
    let form = [
        ("csrf", csrf.as_str()),
        ("amount", "0.50"),
        ("currency", "EUR"),
        ("idempotency_key", key.as_str()),
    ];
    for _ in 0..2 {
        let reply = c.post("/creators/ana/payouts", Some(&session), &form).await;
        assert_eq!(reply.status, 303, "{}", reply.body);
    }
    let payouts = settlement(&c.server.channel, &ana)
        .list_payouts(pb::ListPayoutsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .payouts;
    assert_eq!(payouts.len(), 1);
    assert_eq!(payouts[0].amount.as_ref().unwrap().minor_units, 50);
    // Garbage amounts are refused with a reason, and pay nothing.
    for amount in ["-1", "1e9", "0.001", "lots"] {
        let reply = c
            .post(
                "/creators/ana/payouts",
                Some(&session),
                &[
                    ("csrf", &csrf),
                    ("amount", amount),
                    ("currency", "EUR"),
                    ("idempotency_key", "k2"),
                ],
            )
            .await;
        assert_eq!(reply.status, 400, "{amount}");
    }
    c.stop().await;
}

#[tokio::test]
async fn huge_bodies_garbage_and_unknown_pages_get_clear_statuses() {
    let c = ConsoleServer::start().await;
    let operator = c.sign_in(OPERATOR_TOKEN).await;
    let huge = format!("credential={}", "a".repeat(64 * 1024));
    let reply = c
        .request(
            "POST",
            "/sign-in",
            &[
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("Origin", &c.origin()),
            ],
            huge.as_bytes(),
        )
        .await;
    assert_eq!(reply.status, 413);
    let reply = c
        .request(
            "POST",
            "/sign-in",
            &[("Content-Type", "application/json"), ("Origin", &c.origin())],
            b"{\"credential\": 1}",
        )
        .await;
    assert_eq!(reply.status, 415);
    let reply = c
        .request(
            "POST",
            "/sign-in",
            &[
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("Origin", &c.origin()),
            ],
            &[0xff, 0xfe, b'=', 0x00],
        )
        .await;
    assert!(reply.status == 400 || reply.status == 422, "{}", reply.status);
    assert_eq!(c.get("/nothing-here", Some(&operator)).await.status, 404);
    assert_eq!(c.get("/operator/drops/no-such-drop", Some(&operator)).await.status, 404);
    assert_eq!(
        c.get("/operator/drops/NOT%20AN%20ID", Some(&operator)).await.status,
        400
    );
    assert_eq!(c.get("/assets/../../etc/passwd", None).await.status, 404);
    assert_eq!(
        c.request("DELETE", "/operator", &[("Origin", &c.origin())], b"")
            .await
            .status,
        405
    );
    let reply = c
        .get(
            "/operator/drops/d1/restock?sku_id=tee&hub_id=hub-1&quantity=-3",
            Some(&operator),
        )
        .await;
    assert_eq!(reply.status, 400);
    let order = c
        .server
        .checkout()
        .get_order(GetOrderRequest {
            order_id: "nope".into(),
        })
        .await;
    assert!(order.is_err());
    c.stop().await;
}

#[tokio::test]
async fn a_one_time_link_signs_in_once_and_never_by_its_address() {
    let c = ConsoleServer::start().await;
    let token = c.console.one_time_sign_in(OPERATOR_TOKEN).unwrap();
    assert!(c.console.one_time_sign_in("not a credential").is_err());
    let reply = c.post("/sign-in/once", None, &[("once", &token)]).await;
    assert_eq!(reply.status, 303);
    let session = reply.session().unwrap();
    assert_eq!(c.get("/operator", Some(&session)).await.status, 200);
    let again = c.post("/sign-in/once", None, &[("once", &token)]).await;
    assert_eq!(again.status, 401);
    assert!(again.session().is_none());
    c.stop().await;
}

/// Behind a proxy that terminates TLS (`--console-origin https://…`): forms must come from
/// that origin, not from the address the proxy reached, and the session cookie is `Secure`
/// and `__Host-` prefixed; without the setting such a console refused every sign-in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_tls_proxy_forms_come_from_the_public_origin_and_cookies_are_secure() {
    let public = "https://drops.example.com";
    let c = ConsoleServer::start_with(ConsoleSettings::new(false, Some(public.into()))).await;
    let form = [("credential", OPERATOR_TOKEN)];
    // The address the proxy dialled is not the browser's origin.
    let direct = c.post_from("/sign-in", None, &form, Some(&c.origin())).await;
    assert_eq!(direct.status, 403, "{}", direct.body);
    let foreign = c
        .post_from("/sign-in", None, &form, Some("https://evil.example.com"))
        .await;
    assert_eq!(foreign.status, 403, "{}", foreign.body);
    let signed = c.post_from("/sign-in", None, &form, Some(public)).await;
    assert_eq!(signed.status, 303, "{}", signed.body);
    let cookie = signed.header("set-cookie").unwrap();
    assert!(cookie.starts_with("__Host-dropline-session="), "{cookie}");
    for attribute in ["; Secure", "; HttpOnly", "; SameSite=Strict", "; Path=/"] {
        assert!(cookie.contains(attribute), "{attribute} missing: {cookie}");
    }
    c.stop().await;
}
