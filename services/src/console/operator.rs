//! The operator console: drops (ListDrops), the live drop board (WatchDrop's projection,
//! pushed over server-sent events), hubs with their alerts, partners, an order's or a
//! partner's audit trail; opening, closing and restocking a drop after a confirmation page.

use super::view::{self, enum_word, proto_money, time};
use super::{as_caller, operator_only, Console, CsrfForm, Failure, PageResult, Posted, Signed};
use crate::limits::{CONSOLE_PAGE_SIZE, CONSOLE_STREAM_BUFFER, CONSOLE_STREAM_CHECK_MS, RESERVE_RATE_WINDOW_MS};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect};
use axum::routing::get;
use axum::Router;
use domain::drop::SaleStatus;
use maud::{html, Markup};
use proto::operator::v1::operator_service_server::OperatorService;
use proto::operator::v1::{self as pb, DropStatus};
use proto::registry::v1 as registry;
use proto::registry::v1::partner_registry_service_server::PartnerRegistryService;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::time::{Duration, Instant};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

pub fn routes() -> Router<Console> {
    Router::new()
        .route("/operator", get(drops))
        .route("/operator/drops/{drop_id}", get(board))
        .route("/operator/drops/{drop_id}/live", get(board_live))
        .route("/operator/drops/{drop_id}/open", get(confirm_open).post(open))
        .route("/operator/drops/{drop_id}/close", get(confirm_close).post(close))
        .route("/operator/drops/{drop_id}/restock", get(confirm_restock).post(restock))
        .route("/operator/hubs", get(hubs))
        .route("/operator/hubs/{hub_id}", get(hub))
        .route("/operator/partners", get(partners))
        .route("/operator/partners/{partner_id}", get(partner_audit))
        .route("/operator/orders", get(order_audit))
}

#[derive(Deserialize, Default)]
struct DropsQuery {
    #[serde(default)]
    status: String,
    #[serde(default)]
    page: String,
}

const STATUSES: [(&str, DropStatus); 3] = [
    ("scheduled", DropStatus::Scheduled),
    ("open", DropStatus::Open),
    ("closed", DropStatus::Closed),
];

fn status_word(status: i32) -> String {
    DropStatus::try_from(status).map_or_else(|_| "unknown".into(), |s| enum_word(s.as_str_name(), "DROP_STATUS_"))
}

fn table(label: &str, head: Markup, body: Markup) -> Markup {
    html! {
        div class="table-wrap" tabindex="0" role="region" aria-label=(label) {
            table { thead { (head) } tbody { (body) } }
        }
    }
}

async fn drops(State(console): State<Console>, signed: Signed, Query(q): Query<DropsQuery>) -> PageResult {
    operator_only(&signed)?;
    let status = STATUSES
        .iter()
        .find(|(w, _)| *w == q.status)
        .map_or(DropStatus::Unspecified, |(_, s)| *s);
    let page = console
        .inner
        .operator
        .list_drops(as_caller(
            &signed.session.caller,
            pb::ListDropsRequest {
                status: status as i32,
                page_size: CONSOLE_PAGE_SIZE,
                page_token: q.page.clone(),
            },
        ))
        .await?
        .into_inner();
    let body = html! {
        form method="get" action="/operator" class="inline" {
            label { "Status"
                select name="status" {
                    option value="" selected[q.status.is_empty()] { "any" }
                    @for (word, _) in STATUSES {
                        option value=(word) selected[q.status == word] { (word) }
                    }
                }
            }
            button type="submit" { "Show" }
        }
        @if page.drops.is_empty() {
            p { "No drops" @if !q.status.is_empty() { " " (q.status) } "." }
        } @else {
            (table("Drops", html! {
                tr { th scope="col" { "Drop" } th scope="col" { "Title" } th scope="col" { "Creator" }
                     th scope="col" { "Status" } th scope="col" { "Opens" } th scope="col" { "Closes" }
                     th scope="col" class="n" { "SKUs" } th scope="col" class="n" { "Hubs" } th scope="col" class="n" { "Allocated" } }
            }, html! {
                @for d in &page.drops {
                    tr {
                        td { a href={ "/operator/drops/" (d.drop_id) } { (d.drop_id) } }
                        td { (d.title) }
                        td { (d.creator_id) }
                        td { (status_word(d.status)) }
                        td { (time(d.opens_at.as_ref())) }
                        td { (time(d.closes_at.as_ref())) }
                        td class="n" { (d.skus) }
                        td class="n" { (d.hubs) }
                        td class="n" { (d.allocated) }
                    }
                }
            }))
        }
        @if !page.next_page_token.is_empty() {
            p { a href={ "/operator?status=" (q.status) "&page=" (page.next_page_token) } { "Next page" } }
        }
    };
    Ok(view::page("Drops", Some(&signed.session), body).into_response())
}

/// Units taken (held or sold) per pool over the last `RESERVE_RATE_WINDOW_MS`: the board's
/// reserve rate, from the successive figures the board receives.
#[derive(Default)]
struct Rates {
    samples: HashMap<(String, String), VecDeque<(Instant, u64)>>,
}

impl Rates {
    fn observe(&mut self, drop: &pb::Drop, now: Instant) {
        let window = Duration::from_millis(RESERVE_RATE_WINDOW_MS);
        for sku in &drop.skus {
            for pool in &sku.pools {
                let taken = u64::from(pool.held) + u64::from(pool.sold);
                let samples = self
                    .samples
                    .entry((sku.sku_id.clone(), pool.hub_id.clone()))
                    .or_default();
                samples.push_back((now, taken));
                // Keep one sample older than the window, as its start.
                while samples.len() > 2 && samples.get(1).is_some_and(|(at, _)| now.duration_since(*at) >= window) {
                    samples.pop_front();
                }
            }
        }
    }

    /// Units per second taken from the pool over the window (a return to stock is not a
    /// negative rate).
    fn rate(&self, sku: &str, hub: &str) -> f64 {
        let Some(samples) = self.samples.get(&(sku.to_string(), hub.to_string())) else {
            return 0.0;
        };
        let (Some((first_at, first)), Some((last_at, last))) = (samples.front(), samples.back()) else {
            return 0.0;
        };
        let span = last_at.duration_since(*first_at).as_secs_f64();
        if span <= 0.0 {
            return 0.0;
        }
        last.saturating_sub(*first) as f64 / span
    }
}

fn sale_status(status: i32) -> SaleStatus {
    match DropStatus::try_from(status) {
        Ok(DropStatus::Open) => SaleStatus::Open,
        Ok(DropStatus::Closed) => SaleStatus::Closed,
        _ => SaleStatus::Scheduled,
    }
}

/// Every figure of the board by its key: `<sku>/<hub>/<field>` per pool, `<sku>//<field>`
/// per SKU, `hub/<hub>/<field>` per hub, `drop//<field>`. The page is rendered from these
/// and each live update is these, so the two cannot disagree.
fn board_cells(drop: &pb::Drop, rates: &Rates) -> BTreeMap<String, String> {
    let mut cells = BTreeMap::new();
    let sale = sale_status(drop.status);
    cells.insert("drop//status".into(), status_word(drop.status));
    cells.insert("drop//revenue".into(), proto_money(drop.revenue.as_ref()));
    for sku in &drop.skus {
        let mut sku_rate = 0.0;
        for p in &sku.pools {
            let key = |field: &str| format!("{}/{}/{field}", sku.sku_id, p.hub_id);
            let level = crate::levels::level(sale, u64::from(p.allocated), u64::from(p.available), u64::from(p.held));
            let rate = rates.rate(&sku.sku_id, &p.hub_id);
            sku_rate += rate;
            cells.insert(key("allocated"), p.allocated.to_string());
            cells.insert(key("held"), p.held.to_string());
            cells.insert(key("sold"), p.sold.to_string());
            cells.insert(key("available"), p.available.to_string());
            cells.insert(key("waitlisted"), p.waitlisted.to_string());
            cells.insert(key("level"), enum_word(level.as_str_name(), "LEVEL_"));
            cells.insert(key("rate"), format!("{rate:.1}"));
        }
        let key = |field: &str| format!("{}//{field}", sku.sku_id);
        cells.insert(key("allocated"), sku.allocated.to_string());
        cells.insert(key("held"), sku.held.to_string());
        cells.insert(key("sold"), sku.sold.to_string());
        cells.insert(key("available"), sku.available.to_string());
        cells.insert(key("waitlisted"), sku.waitlisted.to_string());
        cells.insert(key("rate"), format!("{sku_rate:.1}"));
        cells.insert(
            key("sold_out_at"),
            sku.sold_out_at.as_ref().map_or_else(|| "—".into(), |t| time(Some(t))),
        );
    }
    for sku in &drop.skus {
        for e in &sku.edges {
            let key = |field: &str| format!("edge/{}/{}/{field}", sku.sku_id, e.edge_id);
            cells.insert(key("leased"), e.leased.to_string());
            cells.insert(key("sold"), e.sold.to_string());
            cells.insert(key("returned"), e.returned.to_string());
            cells.insert(key("refunded"), e.refunded.to_string());
            let state = match (e.ended, e.online) {
                (true, _) => "ended",
                (false, true) => "online",
                (false, false) => "offline",
            };
            cells.insert(key("state"), state.into());
            cells.insert(key("last_contact"), time(e.last_contact.as_ref()));
            cells.insert(key("last_sync"), time(e.last_sync.as_ref()));
        }
    }
    for h in &drop.hubs {
        let key = |field: &str| format!("hub/{}/{field}", h.hub_id);
        cells.insert(key("open"), h.open_dispatches.to_string());
        cells.insert(key("waiting"), h.waiting_for_partner.to_string());
        cells.insert(key("throttled"), if h.throttled { "throttled" } else { "no" }.into());
        cells.insert(
            key("promise"),
            format!(
                "{} – {}",
                time(h.next_promise_from.as_ref()),
                time(h.next_promise_by.as_ref())
            ),
        );
    }
    cells
}

async fn get_drop(console: &Console, signed: &Signed, drop_id: &str) -> Result<pb::Drop, Failure> {
    Ok(console
        .inner
        .operator
        .get_drop(as_caller(
            &signed.session.caller,
            pb::GetDropRequest {
                drop_id: drop_id.to_string(),
            },
        ))
        .await?
        .into_inner())
}

#[derive(Deserialize, Default)]
struct Done {
    #[serde(default)]
    done: Option<String>,
}

async fn board(
    State(console): State<Console>,
    signed: Signed,
    Path(drop_id): Path<String>,
    Query(done): Query<Done>,
) -> PageResult {
    operator_only(&signed)?;
    let drop = get_drop(&console, &signed, &drop_id).await?;
    let cells = board_cells(&drop, &Rates::default());
    let cell = |key: String, class: &str| {
        let value = cells.get(&key).cloned().unwrap_or_default();
        html! { td class=(class) data-k=(key) { (value) } }
    };
    let pools: Vec<(&pb::SkuFigures, &pb::PoolFigures)> = drop
        .skus
        .iter()
        .flat_map(|s| s.pools.iter().map(move |p| (s, p)))
        .collect();
    let body = html! {
        (view::notice(done.done.as_deref()))
        dl class="facts" {
            dt { "Title" } dd { (drop.title) }
            dt { "Creator" } dd { (drop.creator_id) }
            dt { "Status" } dd data-k="drop//status" { (cells["drop//status"]) }
            dt { "Opens" } dd { (time(drop.opens_at.as_ref())) }
            dt { "Closes" } dd { (time(drop.closes_at.as_ref())) }
            dt { "Revenue" } dd data-k="drop//revenue" { (cells["drop//revenue"]) }
        }
        p id="live-state" class="muted" aria-live="polite" { "Connecting to live figures…" }
        div class="actions" {
            @if drop.status != DropStatus::Open as i32 && drop.status != DropStatus::Closed as i32 {
                a href={ "/operator/drops/" (drop.drop_id) "/open" } { "Open the sale now…" }
            }
            @if drop.status != DropStatus::Closed as i32 {
                a href={ "/operator/drops/" (drop.drop_id) "/close" } { "Close the sale now…" }
            }
        }
        h2 { "Stock by SKU and hub" }
        div data-live={ "/operator/drops/" (drop.drop_id) "/live" } {
            (table("Stock by SKU and hub", html! {
                tr {
                    th scope="col" { "SKU" } th scope="col" { "Hub" }
                    th scope="col" class="n" { "Allocated" } th scope="col" class="n" { "Held" }
                    th scope="col" class="n" { "Sold" } th scope="col" class="n" { "Available" }
                    th scope="col" class="n" { "Waitlisted" } th scope="col" { "Level" }
                    th scope="col" class="n" { "Reserves /s" } th scope="col" { "Sold out at" }
                }
            }, html! {
                @for sku in &drop.skus {
                    @for (s, p) in pools.iter().filter(|(s, _)| s.sku_id == sku.sku_id) {
                        tr {
                            td { (s.name) " (" (s.sku_id) ")" }
                            td { (p.hub_id) " · " (p.city) }
                            (cell(format!("{}/{}/allocated", s.sku_id, p.hub_id), "n"))
                            (cell(format!("{}/{}/held", s.sku_id, p.hub_id), "n"))
                            (cell(format!("{}/{}/sold", s.sku_id, p.hub_id), "n"))
                            (cell(format!("{}/{}/available", s.sku_id, p.hub_id), "n"))
                            (cell(format!("{}/{}/waitlisted", s.sku_id, p.hub_id), "n"))
                            (cell(format!("{}/{}/level", s.sku_id, p.hub_id), ""))
                            (cell(format!("{}/{}/rate", s.sku_id, p.hub_id), "n"))
                            td { "" }
                        }
                    }
                    tr class="total" {
                        td { (sku.name) " (" (sku.sku_id) ")" }
                        td { "all hubs" }
                        (cell(format!("{}//allocated", sku.sku_id), "n"))
                        (cell(format!("{}//held", sku.sku_id), "n"))
                        (cell(format!("{}//sold", sku.sku_id), "n"))
                        (cell(format!("{}//available", sku.sku_id), "n"))
                        (cell(format!("{}//waitlisted", sku.sku_id), "n"))
                        td { "" }
                        (cell(format!("{}//rate", sku.sku_id), "n"))
                        (cell(format!("{}//sold_out_at", sku.sku_id), ""))
                    }
                }
            }))
            @if drop.skus.iter().any(|s| !s.edges.is_empty()) {
                h2 { "Pop-up edges" }
                (table("Pop-up edges", html! {
                    tr { th scope="col" { "Edge" } th scope="col" { "SKU" } th scope="col" { "Hub" }
                         th scope="col" class="n" { "Leased now" } th scope="col" class="n" { "Sold" }
                         th scope="col" class="n" { "Returned" } th scope="col" class="n" { "Refunded" }
                         th scope="col" { "Link" } th scope="col" { "Last contact" } th scope="col" { "Last sync" } }
                }, html! {
                    @for s in &drop.skus {
                        @for e in &s.edges {
                            tr {
                                td { (e.edge_id) }
                                td { (s.sku_id) }
                                td { (e.hub_id) }
                                (cell(format!("edge/{}/{}/leased", s.sku_id, e.edge_id), "n"))
                                (cell(format!("edge/{}/{}/sold", s.sku_id, e.edge_id), "n"))
                                (cell(format!("edge/{}/{}/returned", s.sku_id, e.edge_id), "n"))
                                (cell(format!("edge/{}/{}/refunded", s.sku_id, e.edge_id), "n"))
                                (cell(format!("edge/{}/{}/state", s.sku_id, e.edge_id), ""))
                                (cell(format!("edge/{}/{}/last_contact", s.sku_id, e.edge_id), ""))
                                (cell(format!("edge/{}/{}/last_sync", s.sku_id, e.edge_id), ""))
                            }
                        }
                    }
                }))
            }
            @if !drop.hubs.is_empty() {
                h2 { "Hubs fulfilling this drop" }
                (table("Hubs fulfilling this drop", html! {
                    tr { th scope="col" { "Hub" } th scope="col" class="n" { "Open dispatches" }
                         th scope="col" class="n" { "Waiting for a partner" } th scope="col" { "Throttle" }
                         th scope="col" { "Next promise" } }
                }, html! {
                    @for h in &drop.hubs {
                        tr {
                            td { a href={ "/operator/hubs/" (h.hub_id) } { (h.hub_id) } }
                            (cell(format!("hub/{}/open", h.hub_id), "n"))
                            (cell(format!("hub/{}/waiting", h.hub_id), "n"))
                            (cell(format!("hub/{}/throttled", h.hub_id), ""))
                            (cell(format!("hub/{}/promise", h.hub_id), ""))
                        }
                    }
                }))
            }
        }
        h2 { "Restock" }
        form method="get" action={ "/operator/drops/" (drop.drop_id) "/restock" } class="inline" {
            label { "SKU"
                select name="sku_id" { @for s in &drop.skus { option value=(s.sku_id) { (s.name) } } }
            }
            label { "Hub"
                select name="hub_id" {
                    @for hub in pools.iter().map(|(_, p)| p.hub_id.as_str()).collect::<std::collections::BTreeSet<_>>() {
                        option value=(hub) { (hub) }
                    }
                }
            }
            label { "Units" input type="number" name="quantity" min="1" max="1000000" value="10" required; }
            button type="submit" { "Restock…" }
        }
    };
    Ok(view::page(&format!("Drop {}", drop.drop_id), Some(&signed.session), body).into_response())
}

/// The board's live figures: WatchDrop's stream (the availability projection, at most one
/// update per 250 ms), as `figures` events of [`board_cells`].
async fn board_live(State(console): State<Console>, signed: Signed, Path(drop_id): Path<String>) -> PageResult {
    operator_only(&signed)?;
    let permit = console.inner.streams.clone().try_acquire_owned().map_err(|_| {
        Failure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many live pages are open; retry shortly",
        )
    })?;
    let mut updates = console
        .inner
        .operator
        .watch_drop(as_caller(&signed.session.caller, pb::WatchDropRequest { drop_id }))
        .await?
        .into_inner();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(CONSOLE_STREAM_BUFFER);
    let (console, session_id) = (console.clone(), signed.id.clone());
    tokio::spawn(async move {
        let _permit = permit;
        let mut rates = Rates::default();
        let mut check = tokio::time::interval(Duration::from_millis(CONSOLE_STREAM_CHECK_MS));
        loop {
            tokio::select! {
                next = updates.next() => {
                    let Some(Ok(drop)) = next else { break };
                    rates.observe(&drop, Instant::now());
                    let data = serde_json::to_string(&board_cells(&drop, &rates)).unwrap_or_default();
                    if tx.send(Ok(Event::default().event("figures").data(data))).await.is_err() {
                        return;
                    }
                }
                _ = check.tick() => {
                    if console.inner.sessions.peek(&session_id, &console.inner.auth).is_none() {
                        let _ = tx.send(Ok(Event::default().event("signed-out").data("{}"))).await;
                        return;
                    }
                }
                _ = tx.closed() => return,
            }
        }
    });
    Ok(Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response())
}

#[derive(Deserialize)]
struct ActionForm {
    csrf: String,
}

impl CsrfForm for ActionForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

fn confirmation(signed: &Signed, action: &str, question: Markup, fields: Markup, button: &str, back: &str) -> Markup {
    html! {
        (question)
        form method="post" action=(action) class="actions" {
            (view::csrf(&signed.session))
            (fields)
            button type="submit" class="danger" { (button) }
            a href=(back) { "Cancel" }
        }
    }
}

async fn confirm_open(State(console): State<Console>, signed: Signed, Path(drop_id): Path<String>) -> PageResult {
    operator_only(&signed)?;
    let drop = get_drop(&console, &signed, &drop_id).await?;
    let back = format!("/operator/drops/{}", drop.drop_id);
    let body = confirmation(
        &signed,
        &format!("{back}/open"),
        html! { p { "Open the sale of " strong { (drop.title) } " (" (drop.drop_id) ") now? Buyers can reserve at once; it is now " (status_word(drop.status)) "." } },
        html! {},
        "Open the sale",
        &back,
    );
    Ok(view::page("Open the sale?", Some(&signed.session), body).into_response())
}

async fn confirm_close(State(console): State<Console>, signed: Signed, Path(drop_id): Path<String>) -> PageResult {
    operator_only(&signed)?;
    let drop = get_drop(&console, &signed, &drop_id).await?;
    let back = format!("/operator/drops/{}", drop.drop_id);
    let body = confirmation(
        &signed,
        &format!("{back}/close"),
        html! { p { "Close the sale of " strong { (drop.title) } " (" (drop.drop_id) ") now? No new holds; live holds may still be confirmed until they expire. It cannot be opened again." } },
        html! {},
        "Close the sale",
        &back,
    );
    Ok(view::page("Close the sale?", Some(&signed.session), body).into_response())
}

async fn open(State(console): State<Console>, Path(drop_id): Path<String>, posted: Posted<ActionForm>) -> PageResult {
    operator_only(&posted.signed)?;
    let drop = console
        .inner
        .operator
        .open_drop(as_caller(
            &posted.signed.session.caller,
            pb::OpenDropRequest { drop_id },
        ))
        .await?
        .into_inner();
    Ok(Redirect::to(&format!("/operator/drops/{}?done=The+sale+is+open.", drop.drop_id)).into_response())
}

async fn close(State(console): State<Console>, Path(drop_id): Path<String>, posted: Posted<ActionForm>) -> PageResult {
    operator_only(&posted.signed)?;
    let drop = console
        .inner
        .operator
        .close_drop(as_caller(
            &posted.signed.session.caller,
            pb::CloseDropRequest { drop_id },
        ))
        .await?
        .into_inner();
    Ok(Redirect::to(&format!("/operator/drops/{}?done=The+sale+is+closed.", drop.drop_id)).into_response())
}

#[derive(Deserialize)]
struct RestockQuery {
    sku_id: String,
    hub_id: String,
    quantity: u32,
}

async fn confirm_restock(
    State(console): State<Console>,
    signed: Signed,
    Path(drop_id): Path<String>,
    Query(q): Query<RestockQuery>,
) -> PageResult {
    operator_only(&signed)?;
    let drop = get_drop(&console, &signed, &drop_id).await?;
    let pool = drop
        .skus
        .iter()
        .filter(|s| s.sku_id == q.sku_id)
        .flat_map(|s| s.pools.iter().map(move |p| (s, p)))
        .find(|(_, p)| p.hub_id == q.hub_id)
        .ok_or_else(|| {
            Failure::new(
                StatusCode::NOT_FOUND,
                format!("drop {} has no pool of {} at {}", drop.drop_id, q.sku_id, q.hub_id),
            )
        })?;
    if q.quantity == 0 {
        return Err(Failure::new(StatusCode::BAD_REQUEST, "restock at least 1 unit"));
    }
    let back = format!("/operator/drops/{}", drop.drop_id);
    // A fresh key per confirmation page: submitting this form twice restocks once.
    let key = format!("console-{:032x}", rand::random::<u128>());
    let body = confirmation(
        &signed,
        &format!("{back}/restock"),
        html! {
            p { "Add " strong { (q.quantity) } " units of " strong { (pool.0.name) } " to the pool of " strong { (q.hub_id) }
                " (" (pool.1.city) ")? It has " (pool.1.allocated) " allocated, " (pool.1.available) " available; waitlisted buyers are served first." }
        },
        html! {
            input type="hidden" name="sku_id" value=(q.sku_id);
            input type="hidden" name="hub_id" value=(q.hub_id);
            input type="hidden" name="quantity" value=(q.quantity);
            input type="hidden" name="idempotency_key" value=(key);
        },
        "Restock",
        &back,
    );
    Ok(view::page("Restock?", Some(&signed.session), body).into_response())
}

#[derive(Deserialize)]
struct RestockForm {
    csrf: String,
    sku_id: String,
    hub_id: String,
    quantity: u32,
    idempotency_key: String,
}

impl CsrfForm for RestockForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

async fn restock(
    State(console): State<Console>,
    Path(drop_id): Path<String>,
    posted: Posted<RestockForm>,
) -> PageResult {
    operator_only(&posted.signed)?;
    let f = posted.form;
    let figures = console
        .inner
        .operator
        .restock(as_caller(
            &posted.signed.session.caller,
            pb::RestockRequest {
                drop_id: drop_id.clone(),
                sku_id: f.sku_id,
                hub_id: f.hub_id.clone(),
                city: String::new(),
                quantity: f.quantity,
                idempotency_key: f.idempotency_key,
            },
        ))
        .await?
        .into_inner();
    let allocated = figures
        .pools
        .iter()
        .find(|p| p.hub_id == f.hub_id)
        .map_or(0, |p| p.allocated);
    Ok(Redirect::to(&format!(
        "/operator/drops/{drop_id}?done=Restocked:+{}+at+{}+now+has+{allocated}+allocated.",
        figures.sku_id, f.hub_id
    ))
    .into_response())
}

async fn hubs(State(console): State<Console>, signed: Signed) -> PageResult {
    operator_only(&signed)?;
    let list = console
        .inner
        .registry
        .list_hubs(as_caller(&signed.session.caller, registry::ListHubsRequest::default()))
        .await?
        .into_inner();
    let loads = &console.inner.platform.projections.hub_loads;
    let body = html! {
        @if list.hubs.is_empty() { p { "No hubs yet." } } @else {
            (table("Hubs", html! {
                tr { th scope="col" { "Hub" } th scope="col" { "City" } th scope="col" class="n" { "Slot (min)" }
                     th scope="col" class="n" { "Capacity per slot" } th scope="col" class="n" { "Open dispatches" }
                     th scope="col" class="n" { "Waiting for a partner" } th scope="col" { "Throttle" } }
            }, html! {
                @for h in &list.hubs {
                    @if let Some(spec) = &h.spec {
                        @let load = domain::HubId::parse(&spec.hub_id).ok().and_then(|id| loads.get(&id));
                        tr {
                            td { a href={ "/operator/hubs/" (spec.hub_id) } { (spec.hub_id) } }
                            td { (spec.city) }
                            td class="n" { (spec.slot_minutes) }
                            td class="n" { (spec.capacity_per_slot) }
                            td class="n" { (load.as_ref().map_or(0, |l| l.open)) }
                            td class="n" { (load.as_ref().map_or(0, |l| l.waiting)) }
                            td { (if load.as_ref().is_some_and(|l| l.throttled) { "throttled" } else { "no" }) }
                        }
                    }
                }
            }))
        }
    };
    Ok(view::page("Hubs", Some(&signed.session), body).into_response())
}

fn duration(d: Option<&prost_types::Duration>) -> String {
    d.map_or_else(|| "—".into(), |d| format!("{} s", d.seconds))
}

fn partner_status(status: i32) -> String {
    registry::PartnerStatus::try_from(status)
        .map_or_else(|_| "unknown".into(), |s| enum_word(s.as_str_name(), "PARTNER_STATUS_"))
}

fn score(metrics: Option<&registry::SlaMetrics>) -> String {
    metrics.and_then(|m| m.score_bps).map_or_else(
        || "not scored yet".into(),
        |bps| format!("{:.1} % on time", f64::from(bps) / 100.0),
    )
}

async fn hub(State(console): State<Console>, signed: Signed, Path(hub_id): Path<String>) -> PageResult {
    operator_only(&signed)?;
    let hub = console
        .inner
        .registry
        .get_hub(as_caller(&signed.session.caller, registry::GetHubRequest { hub_id }))
        .await?
        .into_inner();
    let spec = hub.spec.clone().unwrap_or_default();
    let sla = spec.sla.unwrap_or_default();
    let body = html! {
        dl class="facts" {
            dt { "City" } dd { (spec.city) }
            dt { "Delivery slots" } dd { (spec.capacity_per_slot) " deliveries per " (spec.slot_minutes) " min" }
            dt { "Throttle" } dd { @if hub.throttled { "throttled: new orders are promised the window below" } @else { "not throttled" } }
            dt { "Next promise" } dd { (time(hub.next_promise_from.as_ref())) " – " (time(hub.next_promise_by.as_ref())) }
            dt { "SLA targets" } dd { "accept " (duration(sla.accept_within.as_ref())) ", pick up " (duration(sla.pickup_within.as_ref())) ", deliver " (duration(sla.deliver_within.as_ref())) }
            dt { "Open dispatches" } dd { (hub.open_dispatches) " (" (hub.waiting_for_partner) " waiting for a partner)" }
            dt { "Delivered / failed" } dd { (hub.delivered) " / " (hub.failed) }
            dt { "Swaps" } dd { (hub.swaps) }
        }
        h2 { "Partners and SLA health" }
        @if hub.partners.is_empty() { p { "No partners assigned." } } @else {
            (table("Partners at this hub", html! {
                tr { th scope="col" { "Partner" } th scope="col" class="n" { "Rank" } th scope="col" { "Status" }
                     th scope="col" { "SLA score" } th scope="col" class="n" { "Offers" } th scope="col" class="n" { "Missed accepts" }
                     th scope="col" class="n" { "Delivered on time" } th scope="col" class="n" { "Holding now" } }
            }, html! {
                @for p in &hub.partners {
                    @let m = p.metrics.unwrap_or_default();
                    tr {
                        td { a href={ "/operator/partners/" (p.partner_id) } { (p.partner_id) } }
                        td class="n" { (p.rank) }
                        td { (partner_status(p.status)) }
                        td { (score(p.metrics.as_ref())) }
                        td class="n" { (m.offers) }
                        td class="n" { (m.missed_accept) }
                        td class="n" { (m.delivered_on_time) " / " (m.delivered) }
                        td class="n" { (m.open_dispatches) }
                    }
                }
            }))
        }
        h2 id="alerts" { "Alerts" }
        @if hub.alerts.is_empty() { p { "No alerts." } } @else {
            (table("Alerts", html! {
                tr { th scope="col" { "At" } th scope="col" { "Order" } th scope="col" { "Partner" } th scope="col" { "Alert" } }
            }, html! {
                @for a in &hub.alerts {
                    tr class="alert" {
                        td { (time(a.at.as_ref())) }
                        td { @if a.order_id.is_empty() { "—" } @else { a href={ "/operator/orders?order_id=" (a.order_id) } { (a.order_id) } } }
                        td { @if a.partner_id.is_empty() { "—" } @else { a href={ "/operator/partners/" (a.partner_id) } { (a.partner_id) } } }
                        td class="wrap" { (a.message) }
                    }
                }
            }))
        }
    };
    Ok(view::page(&format!("Hub {}", spec.hub_id), Some(&signed.session), body).into_response())
}

#[derive(Deserialize, Default)]
struct PartnersQuery {
    #[serde(default)]
    page: String,
}

async fn partners(State(console): State<Console>, signed: Signed, Query(q): Query<PartnersQuery>) -> PageResult {
    operator_only(&signed)?;
    let list = console
        .inner
        .registry
        .list_partners(as_caller(
            &signed.session.caller,
            registry::ListPartnersRequest {
                page_size: CONSOLE_PAGE_SIZE,
                page_token: q.page,
                ..Default::default()
            },
        ))
        .await?
        .into_inner();
    let body = html! {
        @if list.partners.is_empty() { p { "No partners yet." } } @else {
            (table("Partners", html! {
                tr { th scope="col" { "Partner" } th scope="col" { "Name" } th scope="col" { "Status" }
                     th scope="col" { "Why" } th scope="col" { "Hubs (rank: SLA score)" } th scope="col" class="n" { "Probation on-time deliveries" } }
            }, html! {
                @for p in &list.partners {
                    tr {
                        td { a href={ "/operator/partners/" (p.partner_id) } { (p.partner_id) } }
                        td { (p.name) }
                        td { (partner_status(p.status)) }
                        td { (p.status_source) @if !p.status_reason.is_empty() { ": " (p.status_reason) } }
                        td { @for (i, h) in p.hubs.iter().enumerate() {
                            @if i > 0 { "; " }
                            (h.hub_id) " (" (h.rank) ": " (score(h.metrics.as_ref())) ")"
                        } }
                        td class="n" { (p.hubs.iter().filter_map(|h| h.metrics.as_ref()).map(|m| m.probation_on_time).max().unwrap_or(0)) }
                    }
                }
            }))
        }
        @if !list.next_page_token.is_empty() {
            p { a href={ "/operator/partners?page=" (list.next_page_token) } { "Next page" } }
        }
    };
    Ok(view::page("Partners", Some(&signed.session), body).into_response())
}

fn audit_table(entries: &[registry::AuditEntry]) -> Markup {
    html! {
        @if entries.is_empty() { p { "No entries." } } @else {
            (table("Audit trail", html! {
                tr { th scope="col" { "At" } th scope="col" { "Action" } th scope="col" { "Order" }
                     th scope="col" { "Partner" } th scope="col" { "Hub" } th scope="col" { "Detail" } }
            }, html! {
                @for e in entries {
                    tr {
                        td { (time(e.at.as_ref())) }
                        td { (e.action) }
                        td { (e.order_id) }
                        td { (e.partner_id) }
                        td { (e.hub_id) }
                        td class="wrap" { (e.detail) }
                    }
                }
            }))
        }
    }
}

#[derive(Deserialize, Default)]
struct AuditQuery {
    #[serde(default)]
    order_id: String,
    #[serde(default)]
    page: String,
}

async fn order_audit(State(console): State<Console>, signed: Signed, Query(q): Query<AuditQuery>) -> PageResult {
    operator_only(&signed)?;
    let form = html! {
        form method="get" action="/operator/orders" class="inline" {
            label { "Order id" input type="text" name="order_id" value=(q.order_id) required maxlength="200"; }
            button type="submit" { "Show its audit trail" }
        }
    };
    let trail = if q.order_id.is_empty() {
        html! {}
    } else {
        let page = console
            .inner
            .registry
            .list_audit_entries(as_caller(
                &signed.session.caller,
                registry::ListAuditEntriesRequest {
                    subject: Some(registry::list_audit_entries_request::Subject::OrderId(
                        q.order_id.clone(),
                    )),
                    page_size: CONSOLE_PAGE_SIZE,
                    page_token: q.page,
                },
            ))
            .await?
            .into_inner();
        html! {
            h2 { "Audit trail of " (q.order_id) ", newest first" }
            (audit_table(&page.entries))
            @if !page.next_page_token.is_empty() {
                p { a href={ "/operator/orders?order_id=" (q.order_id) "&page=" (page.next_page_token) } { "Older entries" } }
            }
        }
    };
    Ok(view::page("Orders", Some(&signed.session), html! { (form) (trail) }).into_response())
}

async fn partner_audit(
    State(console): State<Console>,
    signed: Signed,
    Path(partner_id): Path<String>,
    Query(q): Query<PartnersQuery>,
) -> PageResult {
    operator_only(&signed)?;
    let page = console
        .inner
        .registry
        .list_audit_entries(as_caller(
            &signed.session.caller,
            registry::ListAuditEntriesRequest {
                subject: Some(registry::list_audit_entries_request::Subject::PartnerId(
                    partner_id.clone(),
                )),
                page_size: CONSOLE_PAGE_SIZE,
                page_token: q.page,
            },
        ))
        .await?
        .into_inner();
    let body = html! {
        p { "Assignments, swaps, deliveries, status changes and every use of the partner's credential, newest first." }
        (audit_table(&page.entries))
        @if !page.next_page_token.is_empty() {
            p { a href={ "/operator/partners/" (partner_id) "?page=" (page.next_page_token) } { "Older entries" } }
        }
    };
    Ok(view::page(&format!("Partner {partner_id}"), Some(&signed.session), body).into_response())
}
