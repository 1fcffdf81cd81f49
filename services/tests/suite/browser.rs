//! The consoles in a real browser: Debian's headless Chromium driven over WebDriver
//! (chromedriver, fantoccini), both installed by `scripts/install-browser.sh` (the test
//! command runs it). The operator signs in, watches a drop's figures change on the board
//! without a reload while a burst of 256 concurrent reserves runs (the change → page latency
//! is measured and printed, not asserted), walks a hub's alerts to an order's audit trail
//! and restocks after the confirmation page; a pop-up edge that leased stock shows on the
//! board, online, with what it holds; a creator sees its balance with new lines
//! arriving live, downloads the statement as CSV (its totals equal GetStatement's), pays
//! out through the form, and is refused another creator's page; a wrong credential is
//! refused. axe-core checks every page (no serious or critical violation) and each page's
//! screenshot is saved under `target/screenshots/`.

use super::console::{settled_creator, ConsoleServer};
use fantoccini::{Client, ClientBuilder, Locator};
use proto::checkout::v1::ReserveRequest;
use proto::operator::v1::*;
use proto::settlement::v1 as pb;
use serde_json::{json, Value};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use testkit::*;

const CHROMIUM: &str = "/usr/bin/chromium";
/// Reserves in the burst the board is watched through, 256 at a time.
const BURST_RESERVES: usize = 3_000;
const BURST_CONCURRENCY: usize = 256;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn screenshots_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo_root().join("target"), PathBuf::from);
    target.join("screenshots")
}

fn tool(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| panic!("{name} is not installed: run scripts/install-browser.sh (the test command does)"))
}

/// chromedriver on a free loopback port, and a headless Chromium session through it.
struct Browser {
    client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
    axe: String,
}

impl Browser {
    async fn start() -> Browser {
        let driver_bin = tool("chromedriver");
        assert!(
            std::path::Path::new(CHROMIUM).is_file(),
            "{CHROMIUM} is not installed: run scripts/install-browser.sh (the test command does)"
        );
        let axe_path = repo_root().join(".tools/axe/node_modules/axe-core/axe.min.js");
        let axe = std::fs::read_to_string(&axe_path)
            .unwrap_or_else(|e| panic!("{}: {e}: run scripts/install-browser.sh", axe_path.display()));
        let port = free_port();
        let driver = Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let profile = tempfile::tempdir().unwrap();
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                // As root, in a closed network: no sandbox, no background connections.
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--disable-quic", "--no-first-run", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                         format!("--user-data-dir={}", profile.path().display())],
            }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(capabilities.clone())
                .connect(&url)
                .await
            {
                Ok(client) => break client,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("no WebDriver session from chromedriver: {e}"),
            }
        };
        Browser {
            client,
            driver,
            _profile: profile,
            axe,
        }
    }

    async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap();
    }

    async fn path(&self) -> String {
        self.client.current_url().await.unwrap().path().to_string()
    }

    async fn source(&self) -> String {
        self.client.source().await.unwrap()
    }

    async fn fill(&self, css: &str, text: &str) {
        let field = self.client.find(Locator::Css(css)).await.unwrap();
        field.clear().await.unwrap();
        field.send_keys(text).await.unwrap();
    }

    /// Clicks a link or a form's button and waits for the next page to load.
    async fn click(&self, css: &str) {
        self.eval("window.__previousPage = true; return true;").await;
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        self.wait_for(
            "the next page",
            "return window.__previousPage !== true && document.readyState === 'complete'",
            Duration::from_secs(10),
        )
        .await;
    }

    async fn text(&self, css: &str) -> String {
        self.client.find(Locator::Css(css)).await.unwrap().text().await.unwrap()
    }

    async fn eval(&self, script: &str) -> Value {
        self.client.execute(script, vec![]).await.unwrap()
    }

    /// Waits until `script` returns true.
    async fn wait_for(&self, what: &str, script: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while self.eval(script).await != Value::Bool(true) {
            assert!(Instant::now() < deadline, "waited {within:?} for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Saves a screenshot of the page as `target/screenshots/<name>.png` and runs axe-core
    /// on it: no serious or critical violation.
    async fn check_page(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        let dir = screenshots_dir();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
        self.client.execute(&self.axe, vec![]).await.unwrap();
        let violations = self
            .client
            .execute_async(
                "const done = arguments[arguments.length - 1];
                 axe.run(document, { resultTypes: ['violations'] })
                    .then(r => done(r.violations.map(v => ({ id: v.id, impact: v.impact, help: v.help,
                        nodes: v.nodes.map(n => n.target.join(' ')).slice(0, 3) }))))
                    .catch(e => done([{ id: 'axe-failed', impact: 'critical', help: String(e), nodes: [] }]));",
                vec![],
            )
            .await
            .unwrap();
        let violations = violations.as_array().cloned().unwrap_or_default();
        for v in &violations {
            println!(
                "axe {name}: {} ({}): {} {}",
                v["id"], v["impact"], v["help"], v["nodes"]
            );
        }
        let serious: Vec<&Value> = violations
            .iter()
            .filter(|v| v["impact"] == "serious" || v["impact"] == "critical")
            .collect();
        assert!(serious.is_empty(), "{name}: axe-core found {serious:?}");
    }

    async fn sign_in(&self, origin: &str, credential: &str) {
        self.goto(&format!("{origin}/sign-in")).await;
        self.fill("#credential", credential).await;
        self.click("form[action='/sign-in'] button").await;
    }

    async fn sign_out(&self) {
        self.click("form.sign-out button").await;
    }
}

impl std::ops::Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn now_ms() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64() * 1_000.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test]
async fn the_consoles_in_a_real_browser() {
    let c = ConsoleServer::start().await;
    let origin = c.origin();
    let browser = Browser::start().await;

    // A wrong credential is refused, and the page says so without saying why.
    browser.sign_in(&origin, "dlc_not-a-credential").await;
    assert_eq!(browser.path().await, "/sign-in");
    let refusal = browser.text("[role=alert]").await;
    assert!(refusal.contains("not accepted"), "{refusal}");
    browser.check_page("sign-in-refused").await;
    browser.goto(&format!("{origin}/sign-in")).await;
    browser.check_page("sign-in").await;

    // A drop selling in Lisbon (hub-1) and Porto (hub-2, where no partner serves).
    let mut request = drop_request("release-night", &[("hoodie", 20_000), ("cap", 500)], 2, 600);
    request.title = "Release night".into();
    for sku in &mut request.skus {
        sku.allocations.push(Allocation {
            hub_id: "hub-2".into(),
            city: "Porto".into(),
            quantity: 200,
        });
    }
    open_drop(&c.server, request).await;

    browser.sign_in(&origin, OPERATOR_TOKEN).await;
    assert_eq!(browser.path().await, "/operator");
    assert!(browser.source().await.contains("release-night"));
    browser.check_page("operator-drops").await;

    // The board, live: its figures change with no reload while a burst runs.
    browser.goto(&format!("{origin}/operator/drops/release-night")).await;
    browser
        .wait_for(
            "the board's live stream",
            "return document.getElementById('live-state').textContent.startsWith('Live')",
            Duration::from_secs(10),
        )
        .await;
    browser
        .eval(
            "window.__sameDocument = true; window.__seen = [];
             const cell = document.querySelector('[data-k=\"hoodie//held\"]');
             new MutationObserver(() => window.__seen.push([Date.now(), Number(cell.textContent)]))
                 .observe(cell, { childList: true, characterData: true, subtree: true });
             return true;",
        )
        .await;
    // The server's side: every change of the projection the board follows, when it
    // happened and the hoodie's held total then.
    let changes: Arc<Mutex<Vec<(f64, u64)>>> = Arc::default();
    let drop_id = domain::DropId::parse("release-night").unwrap();
    let follower = {
        let (changes, platform, drop_id) = (changes.clone(), c.server.platform.clone(), drop_id.clone());
        tokio::spawn(async move {
            let mut version = platform.projections.availability.subscribe();
            let mut last = 0;
            while version.changed().await.is_ok() {
                let at = now_ms();
                let Some(cached) = platform.projections.availability.get(&drop_id) else {
                    continue;
                };
                let held: u64 = cached
                    .skus
                    .iter()
                    .filter(|s| s.sku_id.as_str() == "hoodie")
                    .flat_map(|s| s.pools.iter().map(|p| u64::from(p.pool.held)))
                    .sum();
                if held != last {
                    last = held;
                    changes.lock().unwrap().push((at, held));
                }
            }
        })
    };
    let started = Instant::now();
    let checkout = c.server.checkout();
    let results: Vec<bool> = futures::StreamExt::collect(futures::StreamExt::buffer_unordered(
        futures::stream::iter((0..BURST_RESERVES).map(|i| {
            let mut checkout = checkout.clone();
            async move {
                checkout
                    .reserve(ReserveRequest {
                        drop_id: "release-night".into(),
                        sku_id: "hoodie".into(),
                        buyer_id: format!("burst-{i}"),
                        city: "Lisbon".into(),
                        quantity: 1,
                        idempotency_key: format!("burst-{i}"),
                        ..Default::default()
                    })
                    .await
                    .is_ok()
            }
        })),
        BURST_CONCURRENCY,
    ))
    .await;
    let burst = started.elapsed();
    assert!(results.iter().all(|ok| *ok), "every reserve of the burst is held");
    let held_now = c.server.drop_figures("release-night").await.skus[0].held;
    assert_eq!(held_now as usize, BURST_RESERVES);
    browser
        .wait_for(
            "the board to show the burst's last hold",
            &format!("return document.querySelector('[data-k=\"hoodie//held\"]').textContent === '{BURST_RESERVES}'"),
            Duration::from_secs(10),
        )
        .await;
    follower.abort();
    assert_eq!(
        browser.eval("return window.__sameDocument === true").await,
        Value::Bool(true),
        "no reload"
    );
    let seen: Vec<(f64, u64)> = serde_json::from_value::<Vec<(f64, f64)>>(browser.eval("return window.__seen").await)
        .unwrap()
        .into_iter()
        .map(|(at, held)| (at, held as u64))
        .collect();
    assert!(
        seen.len() >= 2,
        "the board changed several times during the burst: {seen:?}"
    );
    let changes = changes.lock().unwrap().clone();
    let mut latencies: Vec<f64> = changes
        .iter()
        .filter_map(|(at, held)| {
            seen.iter()
                .find(|(_, shown)| shown >= held)
                .map(|(shown_at, _)| shown_at - at)
        })
        .collect();
    assert_eq!(latencies.len(), changes.len(), "every change reached the page");
    latencies.sort_by(f64::total_cmp);
    let figure = format!(
        "board latency, change → page, during a {BURST_RESERVES}-reserve burst at {BURST_CONCURRENCY} concurrent \
         ({:.0} reserves/s, debug build): {} changes, {} page updates; p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        BURST_RESERVES as f64 / burst.as_secs_f64(),
        changes.len(),
        seen.len(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies.last().unwrap(),
    );
    // Straight to stderr, past the test harness's capture: the figure shows in every run's
    // output, and is kept beside the screenshots.
    let _ = writeln!(std::io::stderr(), "{figure}");
    std::fs::create_dir_all(screenshots_dir()).unwrap();
    std::fs::write(screenshots_dir().join("board-latency.txt"), format!("{figure}\n")).unwrap();

    // A pop-up edge in Porto leases 40 caps and calls in: the board lists it (the table
    // comes with the drop's first edge, so the board is opened again), online, with the
    // units it holds; its cells are live like the rest.
    let edge_credential = storefront_credential(std::slice::from_ref(&c.server.channel), OPERATOR_TOKEN, "popup-porto")
        .await
        .unwrap();
    c.server
        .operator()
        .lease_stock(LeaseStockRequest {
            drop_id: "release-night".into(),
            sku_id: "cap".into(),
            hub_id: "hub-2".into(),
            edge_id: "popup-porto".into(),
            quantity: 40,
            top_up_max: 60,
            key_id: "porto-2026-12".into(),
            expires_at: Some(ts(3_600)),
            reconcile_window_seconds: 600,
        })
        .await
        .unwrap();
    let mut edge = proto::edge::v1::edge_service_client::EdgeServiceClient::with_interceptor(
        c.server.channel.clone(),
        services::auth::Bearer::new(&edge_credential).unwrap(),
    );
    let leases = edge
        .list_leases(proto::edge::v1::ListEdgeLeasesRequest {
            drop_id: "release-night".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(leases.leases.len(), 1, "the edge reads its one lease");
    browser.goto(&format!("{origin}/operator/drops/release-night")).await;
    browser
        .wait_for(
            "the board to show the edge online with its 40 caps",
            "const cell = (k) => document.querySelector(`[data-k=\"edge/cap/popup-porto/${k}\"]`);
             return cell('state')?.textContent === 'online' && cell('leased')?.textContent === '40'",
            Duration::from_secs(10),
        )
        .await;
    browser.check_page("operator-board").await;
    browser
        .eval(
            "[...document.querySelectorAll('h2')].find(h => h.textContent === 'Pop-up edges').scrollIntoView();
             return true;",
        )
        .await;
    browser.check_page("operator-board-edges").await;
    browser.eval("window.scrollTo(0, 0); return true;").await;
    browser.client.set_window_size(390, 844).await.unwrap();
    browser.check_page("operator-board-phone").await;
    browser.client.set_window_size(1280, 900).await.unwrap();

    // Restock after the confirmation page.
    browser.fill("input[name=quantity]", "25").await;
    browser.click("form[action$='/restock'] button").await;
    assert!(browser.path().await.ends_with("/restock"));
    browser.check_page("operator-restock-confirm").await;
    browser.click("form[action$='/restock'] button.danger").await;
    assert!(browser.text("[role=status]").await.contains("Restocked"));
    assert_eq!(c.server.drop_figures("release-night").await.skus[0].allocated, 20_225);

    // A Porto order meets no partner at hub-2: an alert there, walked to its audit trail.
    let mut checkout = c.server.checkout();
    let held = checkout
        .reserve(ReserveRequest {
            drop_id: "release-night".into(),
            sku_id: "cap".into(),
            buyer_id: "porto-buyer".into(),
            city: "Porto".into(),
            quantity: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    checkout.confirm(pickup(&held.order_id, 2_500)).await.unwrap();
    browser.goto(&format!("{origin}/operator/hubs")).await;
    browser.check_page("operator-hubs").await;
    browser.click("a[href='/operator/hubs/hub-2']").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !browser.source().await.contains(&held.order_id) {
        assert!(Instant::now() < deadline, "hub-2 shows no alert for {}", held.order_id);
        tokio::time::sleep(Duration::from_millis(200)).await;
        browser.client.refresh().await.unwrap();
    }
    assert!(browser.text("tr.alert").await.contains("no eligible partner"));
    browser.check_page("operator-hub-alerts").await;
    browser.click("tr.alert a[href^='/operator/orders']").await;
    assert!(browser.text("h2").await.contains(&held.order_id));
    browser.check_page("operator-order-audit").await;
    courier(&c.server.channel, "rapido", "hub-2", 1).await;
    browser.goto(&format!("{origin}/operator/partners")).await;
    assert!(browser.source().await.contains("rapido"));
    browser.check_page("operator-partners").await;
    browser.sign_out().await;
    assert_eq!(browser.path().await, "/sign-in");

    // The creator.
    let ana = settled_creator(&c.server, "ana", "ana-drop").await;
    let _bea = settled_creator(&c.server, "bea", "bea-drop").await;
    browser.sign_in(&origin, &ana).await;
    assert_eq!(browser.path().await, "/creators/ana");
    browser
        .wait_for(
            "the balance page's live stream",
            "return document.getElementById('live-state').textContent.startsWith('Live')",
            Duration::from_secs(10),
        )
        .await;
    browser.eval("window.__sameDocument = true; return true;").await;
    // A new line (a payout) appears on the open page.
    let paid = settlement(&c.server.channel, &ana)
        .request_payout(pb::RequestPayoutRequest {
            creator_id: String::new(),
            amount: eur(10),
            idempotency_key: "live-line".into(),
        })
        .await
        .unwrap()
        .into_inner();
    browser
        .wait_for(
            "the payout's line on the open balance page",
            &format!("return !!document.getElementById('line-{}')", paid.line_seq),
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(
        browser.eval("return window.__sameDocument === true").await,
        Value::Bool(true)
    );
    browser.check_page("creator-balance").await;

    browser.goto(&format!("{origin}/creators/ana/statement")).await;
    browser.check_page("creator-statement").await;
    let csv = browser
        .client
        .execute_async(
            "const done = arguments[arguments.length - 1];
             fetch('/creators/ana/statement.csv').then(r => r.text()).then(done, e => done('failed: ' + e));",
            vec![],
        )
        .await
        .unwrap();
    let csv = csv.as_str().unwrap().to_string();
    let statement = settlement(&c.server.channel, &ana)
        .get_statement(pb::GetStatementRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut reader = csv::Reader::from_reader(csv.as_bytes());
    let header = reader.headers().unwrap().clone();
    let column = |name: &str| header.iter().position(|h| h == name).unwrap();
    let mut sums = std::collections::BTreeMap::<String, [i64; 8]>::new();
    for record in reader.records() {
        let record = record.unwrap();
        assert_eq!(&record[column("creator_id")], "ana");
        let sum = sums.entry(record[column("currency")].to_string()).or_default();
        sum[0] += 1;
        for (i, name) in [
            "gross_minor",
            "platform_fee_minor",
            "partner_fee_minor",
            "creator_net_minor",
            "remedy_minor",
            "paid_out_minor",
            "available_change_minor",
        ]
        .iter()
        .enumerate()
        {
            sum[i + 1] += record[column(name)].parse::<i64>().unwrap();
        }
    }
    let totals: std::collections::BTreeMap<String, [i64; 8]> = statement
        .totals
        .iter()
        .map(|t| {
            (
                t.currency.clone(),
                [
                    t.lines as i64,
                    t.gross,
                    t.platform_fee,
                    t.partner_fee,
                    t.creator_net,
                    t.remedy,
                    t.paid_out,
                    t.available_change,
                ],
            )
        })
        .collect();
    assert_eq!(sums, totals, "the CSV's totals are GetStatement's");
    assert!(
        totals["EUR"][0] >= 7,
        "sales, a refund, a return, releases and a payout: {totals:?}"
    );

    browser.goto(&format!("{origin}/creators/ana/returns")).await;
    let page = browser.source().await;
    assert!(page.contains("wrong size") && page.contains("damaged at the hub"));
    browser.check_page("creator-returns").await;

    browser.goto(&format!("{origin}/creators/ana/payouts")).await;
    browser.fill("input[name=amount]", "0.25").await;
    browser.click("form[action$='/payouts'] button").await;
    assert!(browser.text("[role=status]").await.contains("0.25 EUR"));
    browser.check_page("creator-payouts").await;

    // Another creator's page: refused, none of its data shown.
    browser.goto(&format!("{origin}/creators/bea")).await;
    let page = browser.source().await;
    assert!(page.contains("403") && page.contains("another creator"));
    assert!(!page.contains("bea-drop"));
    browser.goto(&format!("{origin}/creators/bea/statement.csv")).await;
    assert!(!browser.source().await.contains("bea-drop"));

    browser.client.clone().close().await.unwrap();
    c.stop().await;
}
