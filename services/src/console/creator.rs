//! The creator console: the balance (pending, available, paid out) with new statement lines
//! live (WatchSettlement's feed), the statement of a period page by page and as CSV (the
//! lines GetStatement returns, so the totals agree), payouts (idempotent by a key the form
//! carries), returns and refunds with their reasons. Every page is under
//! `/creators/<creator_id>/` and only that creator's session may open it.

use super::view::{self, time};
use super::{as_caller, creator_only, Console, CsrfForm, Failure, PageResult, Posted, Signed};
use crate::limits::{CONSOLE_PAGE_SIZE, CONSOLE_RETURNS_SCAN_MAX, CONSOLE_STREAM_BUFFER, CONSOLE_STREAM_CHECK_MS};
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect};
use axum::routing::get;
use axum::Router;
use domain::limits::STATEMENT_PAGE_MAX;
use maud::{html, Markup};
use proto::settlement::v1 as pb;
use proto::settlement::v1::settlement_service_server::SettlementService;
use serde::Deserialize;
use std::convert::Infallible;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

pub fn routes() -> Router<Console> {
    Router::new()
        .route("/creators/{creator_id}", get(balance))
        .route("/creators/{creator_id}/live", get(live))
        .route("/creators/{creator_id}/statement", get(statement))
        .route("/creators/{creator_id}/statement.csv", get(statement_csv))
        .route("/creators/{creator_id}/payouts", get(payouts).post(request_payout))
        .route("/creators/{creator_id}/returns", get(returns))
}

/// Lines shown on the balance page when it opens; newer ones arrive live.
const RECENT_LINES: u64 = 10;

fn table(label: &str, head: Markup, body: Markup) -> Markup {
    table_with(label, head, body, None)
}

/// A table whose body has an id (the live lines go into it).
fn table_with(label: &str, head: Markup, body: Markup, body_id: Option<&str>) -> Markup {
    html! {
        div class="table-wrap" tabindex="0" role="region" aria-label=(label) {
            table { thead { (head) } tbody id=[body_id] { (body) } }
        }
    }
}

fn kind(k: i32) -> String {
    pb::LineKind::try_from(k).map_or_else(|_| "unknown".into(), |k| view::enum_word(k.as_str_name(), "LINE_KIND_"))
}

/// A line as the tables show it (and as a live `line` event carries it).
fn line_cells(l: &pb::StatementLine) -> Vec<String> {
    let m = |v: i64| view::money(v, &l.currency);
    vec![
        l.seq.to_string(),
        time(l.booked_at.as_ref()),
        kind(l.kind),
        l.order_id.clone(),
        l.reference.clone(),
        m(l.gross),
        m(l.creator_net),
        m(l.available_change),
        m(l.paid_out),
    ]
}

fn lines_head() -> Markup {
    html! {
        tr { th scope="col" class="n" { "Line" } th scope="col" { "Booked at" } th scope="col" { "Kind" }
             th scope="col" { "Order" } th scope="col" { "Reference" } th scope="col" class="n" { "Gross" }
             th scope="col" class="n" { "Your net" } th scope="col" class="n" { "Available change" }
             th scope="col" class="n" { "Paid out" } }
    }
}

fn line_row(l: &pb::StatementLine) -> Markup {
    html! {
        tr id={ "line-" (l.seq) } {
            @for cell in line_cells(l) { td { (cell) } }
        }
    }
}

/// Balance figures by key, for the page and its live updates.
fn balance_cells(balance: &pb::Balance) -> serde_json::Map<String, serde_json::Value> {
    let mut cells = serde_json::Map::new();
    for c in &balance.currencies {
        let m = |v: i64| serde_json::Value::String(view::money(v, &c.currency));
        cells.insert(format!("balance/{}/pending", c.currency), m(c.pending));
        cells.insert(format!("balance/{}/available", c.currency), m(c.available));
        cells.insert(format!("balance/{}/paid_out", c.currency), m(c.paid_out));
    }
    cells
}

async fn get_balance(console: &Console, signed: &Signed) -> Result<pb::Balance, Failure> {
    Ok(console
        .inner
        .settlement
        .get_balance(as_caller(&signed.session.caller, pb::GetBalanceRequest::default()))
        .await?
        .into_inner())
}

async fn get_statement(
    console: &Console,
    signed: &Signed,
    request: pb::GetStatementRequest,
) -> Result<pb::Statement, Failure> {
    Ok(console
        .inner
        .settlement
        .get_statement(as_caller(&signed.session.caller, request))
        .await?
        .into_inner())
}

async fn balance(State(console): State<Console>, signed: Signed, Path(creator_id): Path<String>) -> PageResult {
    let creator = creator_only(&signed, &creator_id)?;
    let balance = get_balance(&console, &signed).await?;
    // Lines are numbered 1, 2, … in a ledger: the totals of the whole ledger say how many
    // there are, so the last few are one page away.
    let all = get_statement(
        &console,
        &signed,
        pb::GetStatementRequest {
            page_size: 1,
            ..Default::default()
        },
    )
    .await?;
    let count: u64 = all.totals.iter().map(|t| t.lines).sum();
    let recent = get_statement(
        &console,
        &signed,
        pb::GetStatementRequest {
            page_size: RECENT_LINES as u32,
            page_token: if count > RECENT_LINES {
                (count - RECENT_LINES).to_string()
            } else {
                String::new()
            },
            ..Default::default()
        },
    )
    .await?;
    let cells = balance_cells(&balance);
    let cell = |key: String| {
        let value = cells.get(&key).and_then(|v| v.as_str()).unwrap_or("—").to_string();
        html! { td class="n" data-k=(key) { (value) } }
    };
    let body = html! {
        div data-live={ "/creators/" (creator) "/live?after=" (count) } {
            h2 { "Balance" }
            @if balance.currencies.is_empty() { p { "Nothing booked yet." } } @else {
                (table("Balance", html! {
                    tr { th scope="col" { "Currency" } th scope="col" class="n" { "Pending (in return windows)" }
                         th scope="col" class="n" { "Available" } th scope="col" class="n" { "Paid out" } }
                }, html! {
                    @for c in &balance.currencies {
                        tr {
                            td { (c.currency) }
                            (cell(format!("balance/{}/pending", c.currency)))
                            (cell(format!("balance/{}/available", c.currency)))
                            (cell(format!("balance/{}/paid_out", c.currency)))
                        }
                    }
                }))
            }
            p id="live-state" class="muted" aria-live="polite" { "Connecting to live lines…" }
            h2 { "Latest lines, newest first" }
            (table_with("Latest lines", lines_head(), html! {
                @if recent.lines.is_empty() {
                    tr id="no-lines" { td colspan="9" { "No lines yet." } }
                }
                @for l in recent.lines.iter().rev() { (line_row(l)) }
            }, Some("live-lines")))
        }
    };
    Ok(view::page(&format!("Balance of {creator}"), Some(&signed.session), body).into_response())
}

#[derive(Deserialize, Default)]
struct LiveQuery {
    #[serde(default)]
    after: u64,
}

/// New statement lines as `line` events (WatchSettlement's feed from `after`), each batch
/// followed by the balance as a `figures` event.
async fn live(
    State(console): State<Console>,
    signed: Signed,
    Path(creator_id): Path<String>,
    Query(q): Query<LiveQuery>,
) -> PageResult {
    creator_only(&signed, &creator_id)?;
    let permit = console.inner.streams.clone().try_acquire_owned().map_err(|_| {
        Failure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many live pages are open; retry shortly",
        )
    })?;
    let mut lines = console
        .inner
        .settlement
        .watch_settlement(as_caller(
            &signed.session.caller,
            pb::WatchSettlementRequest {
                creator_id: String::new(),
                after_seq: q.after,
            },
        ))
        .await?
        .into_inner();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(CONSOLE_STREAM_BUFFER);
    tokio::spawn(async move {
        let _permit = permit;
        let mut check = tokio::time::interval(Duration::from_millis(CONSOLE_STREAM_CHECK_MS));
        loop {
            tokio::select! {
                next = lines.next() => {
                    let Some(Ok(line)) = next else { break };
                    let data = serde_json::json!({ "seq": line.seq, "cells": line_cells(&line) });
                    if tx.send(Ok(Event::default().event("line").data(data.to_string()))).await.is_err() {
                        return;
                    }
                    // Coalesce: the balance once the lines booked together have been sent.
                    if futures::FutureExt::now_or_never(lines.next()).is_none() {
                        if let Ok(balance) = get_balance(&console, &signed).await {
                            let data = serde_json::Value::Object(balance_cells(&balance)).to_string();
                            if tx.send(Ok(Event::default().event("figures").data(data))).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                _ = check.tick() => {
                    if console.inner.sessions.peek(&signed.id, &console.inner.auth).is_none() {
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

/// A period from the forms' dates (`YYYY-MM-DD`, UTC): from the start of `from` to the end
/// of `to`, either open.
#[derive(Deserialize, Default, Clone)]
struct Period {
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
    #[serde(default)]
    page: String,
}

fn day_start(field: &str, value: &str, days_after: i64) -> Result<Option<prost_types::Timestamp>, Failure> {
    if value.is_empty() {
        return Ok(None);
    }
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let date = time::Date::parse(value, &format)
        .map_err(|_| Failure::new(StatusCode::BAD_REQUEST, format!("{field} must be a date as YYYY-MM-DD")))?;
    let at = date.midnight().assume_utc().unix_timestamp() + days_after * 86_400;
    Ok(Some(prost_types::Timestamp { seconds: at, nanos: 0 }))
}

impl Period {
    fn bounds(&self) -> Result<(Option<prost_types::Timestamp>, Option<prost_types::Timestamp>), Failure> {
        Ok((day_start("from", &self.from, 0)?, day_start("to", &self.to, 1)?))
    }

    fn query(&self) -> String {
        format!("from={}&to={}", self.from, self.to)
    }
}

fn period_form(action: &str, period: &Period, button: &str) -> Markup {
    html! {
        form method="get" action=(action) class="inline" {
            label { "From" input type="date" name="from" value=(period.from); }
            label { "To (inclusive)" input type="date" name="to" value=(period.to); }
            button type="submit" { (button) }
        }
    }
}

async fn statement(
    State(console): State<Console>,
    signed: Signed,
    Path(creator_id): Path<String>,
    Query(period): Query<Period>,
) -> PageResult {
    let creator = creator_only(&signed, &creator_id)?;
    let (from, to) = period.bounds()?;
    let s = get_statement(
        &console,
        &signed,
        pb::GetStatementRequest {
            creator_id: String::new(),
            from,
            to,
            page_size: CONSOLE_PAGE_SIZE,
            page_token: period.page.clone(),
        },
    )
    .await?;
    let base = format!("/creators/{creator}/statement");
    let body = html! {
        (period_form(&base, &period, "Show"))
        p { a href={ (base) ".csv?" (period.query()) } download { "Download the period as CSV" } }
        h2 { "Totals of the period" }
        @if s.totals.is_empty() { p { "No lines in this period." } } @else {
            (table("Totals of the period", html! {
                tr { th scope="col" { "Currency" } th scope="col" class="n" { "Lines" } th scope="col" class="n" { "Sales" }
                     th scope="col" class="n" { "Gross" } th scope="col" class="n" { "Platform fees" } th scope="col" class="n" { "Partner fees" }
                     th scope="col" class="n" { "Your net" } th scope="col" class="n" { "Remedies" } th scope="col" class="n" { "Paid out" } }
            }, html! {
                @for t in &s.totals {
                    @let m = |v: i64| view::money(v, &t.currency);
                    tr class="total" {
                        td { (t.currency) }
                        td class="n" { (t.lines) } td class="n" { (t.sales) }
                        td class="n" { (m(t.gross)) } td class="n" { (m(t.platform_fee)) } td class="n" { (m(t.partner_fee)) }
                        td class="n" { (m(t.creator_net)) } td class="n" { (m(t.remedy)) } td class="n" { (m(t.paid_out)) }
                    }
                }
            }))
        }
        h2 { "Lines" }
        (table("Statement lines", lines_head(), html! { @for l in &s.lines { (line_row(l)) } }))
        @if !s.next_page_token.is_empty() {
            p { a href={ (base) "?" (period.query()) "&page=" (s.next_page_token) } { "Next page" } }
        }
    };
    Ok(view::page(&format!("Statement of {creator}"), Some(&signed.session), body).into_response())
}

fn rfc3339(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| time::OffsetDateTime::from_unix_timestamp(t.seconds).ok())
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

/// One page of lines as CSV rows (the columns of `dropline settlement statement --csv`).
fn csv_rows(creator: &str, lines: &[pb::StatementLine], header: bool) -> Result<bytes::Bytes, std::io::Error> {
    let mut w = csv::Writer::from_writer(Vec::new());
    if header {
        w.write_record(crate::settlement::STATEMENT_CSV_HEADER)?;
    }
    for l in lines {
        w.write_record([
            creator.to_string(),
            l.seq.to_string(),
            rfc3339(l.booked_at.as_ref()),
            kind(l.kind),
            l.order_id.clone(),
            l.drop_id.clone(),
            l.currency.clone(),
            l.gross.to_string(),
            l.platform_fee.to_string(),
            l.partner_fee.to_string(),
            l.creator_net.to_string(),
            l.remedy.to_string(),
            l.paid_out.to_string(),
            l.available_change.to_string(),
            l.reference.clone(),
        ])?;
    }
    w.into_inner().map(bytes::Bytes::from).map_err(|e| e.into_error())
}

/// The period's every line as CSV, read from GetStatement a page at a time while it is
/// sent (a long statement is never held whole).
async fn statement_csv(
    State(console): State<Console>,
    signed: Signed,
    Path(creator_id): Path<String>,
    Query(period): Query<Period>,
) -> PageResult {
    let creator = creator_only(&signed, &creator_id)?;
    let (from, to) = period.bounds()?;
    let request = move |page_token: String| pb::GetStatementRequest {
        creator_id: String::new(),
        from,
        to,
        page_size: STATEMENT_PAGE_MAX,
        page_token,
    };
    // The first page before answering, so a failure is a status, not a cut-off download.
    let first = get_statement(&console, &signed, request(String::new())).await?;
    let first_rows = csv_rows(creator.as_str(), &first.lines, true)
        .map_err(|e| Failure::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let name = creator.to_string();
    let rest = futures::stream::unfold(Some(first.next_page_token), move |token| {
        let (console, signed, name) = (console.clone(), signed.clone(), name.clone());
        let request = request;
        async move {
            let token = token.filter(|t| !t.is_empty())?;
            match get_statement(&console, &signed, request(token)).await {
                Ok(page) => Some((csv_rows(&name, &page.lines, false), Some(page.next_page_token))),
                Err(failure) => Some((Err(std::io::Error::other(failure.message)), None)),
            }
        }
    });
    let body = futures::stream::once(async move { Ok::<_, std::io::Error>(first_rows) }).chain(rest);
    let filename = format!(
        "statement-{creator}{}{}.csv",
        if period.from.is_empty() {
            String::new()
        } else {
            format!("-from-{}", period.from)
        },
        if period.to.is_empty() {
            String::new()
        } else {
            format!("-to-{}", period.to)
        },
    );
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{filename}\""),
            ),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

#[derive(Deserialize, Default)]
struct PayoutsQuery {
    #[serde(default)]
    page: String,
    #[serde(default)]
    done: Option<String>,
}

async fn payouts(
    State(console): State<Console>,
    signed: Signed,
    Path(creator_id): Path<String>,
    Query(q): Query<PayoutsQuery>,
) -> PageResult {
    let creator = creator_only(&signed, &creator_id)?;
    let balance = get_balance(&console, &signed).await?;
    let list = console
        .inner
        .settlement
        .list_payouts(as_caller(
            &signed.session.caller,
            pb::ListPayoutsRequest {
                creator_id: String::new(),
                page_size: CONSOLE_PAGE_SIZE,
                page_token: q.page,
            },
        ))
        .await?
        .into_inner();
    // A fresh key per form: the same form sent twice pays once.
    let key = format!("console-{:032x}", rand::random::<u128>());
    let body = html! {
        (view::notice(q.done.as_deref()))
        h2 { "Request a payout" }
        @if balance.currencies.is_empty() { p { "Nothing is available yet." } } @else {
            p { "Available now: "
                @for (i, c) in balance.currencies.iter().enumerate() {
                    @if i > 0 { ", " } (view::money(c.available, &c.currency))
                } "." }
            form method="post" action={ "/creators/" (creator) "/payouts" } class="inline" {
                (view::csrf(&signed.session))
                input type="hidden" name="idempotency_key" value=(key);
                label { "Amount" input type="text" name="amount" inputmode="decimal" required pattern="[0-9]+([.][0-9]{1,3})?" placeholder="12.50"; }
                label { "Currency"
                    select name="currency" { @for c in &balance.currencies { option value=(c.currency) { (c.currency) } } }
                }
                button type="submit" { "Request payout" }
            }
        }
        h2 { "Payouts, newest first" }
        @if list.payouts.is_empty() { p { "No payouts yet." } } @else {
            (table("Payouts", html! {
                tr { th scope="col" { "Payout" } th scope="col" { "Paid at" } th scope="col" class="n" { "Amount" } th scope="col" class="n" { "Statement line" } }
            }, html! {
                @for p in &list.payouts {
                    tr { td { (p.payout_id) } td { (time(p.paid_at.as_ref())) } td class="n" { (view::proto_money(p.amount.as_ref())) } td class="n" { (p.line_seq) } }
                }
            }))
        }
        @if !list.next_page_token.is_empty() {
            p { a href={ "/creators/" (creator) "/payouts?page=" (list.next_page_token) } { "Older payouts" } }
        }
    };
    Ok(view::page("Payouts", Some(&signed.session), body).into_response())
}

#[derive(Deserialize)]
struct PayoutForm {
    csrf: String,
    amount: String,
    currency: String,
    idempotency_key: String,
}

impl CsrfForm for PayoutForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// `12.5` in a currency of `exponent` decimals as minor units (`1250` for 2).
fn minor_units(text: &str, exponent: u32) -> Option<i64> {
    let text = text.trim();
    let (whole, fraction) = match text.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (text, None),
    };
    let digits = |s: &str| !s.is_empty() && s.len() <= 15 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || fraction.is_some_and(|f| !digits(f) || f.len() > exponent as usize) {
        return None;
    }
    let scale = 10i64.pow(exponent);
    let fraction = format!("{:0<width$}", fraction.unwrap_or(""), width = exponent as usize);
    let fraction: i64 = if exponent == 0 { 0 } else { fraction.parse().ok()? };
    whole.parse::<i64>().ok()?.checked_mul(scale)?.checked_add(fraction)
}

async fn request_payout(
    State(console): State<Console>,
    Path(creator_id): Path<String>,
    posted: Posted<PayoutForm>,
) -> PageResult {
    let creator = creator_only(&posted.signed, &creator_id)?;
    let f = posted.form;
    let exponent = domain::money::exponent_of(&f.currency);
    let minor = minor_units(&f.amount, exponent).ok_or_else(|| {
        Failure::new(
            StatusCode::BAD_REQUEST,
            format!("the amount must be a number with at most {exponent} decimals, e.g. 12.50"),
        )
    })?;
    let payout = console
        .inner
        .settlement
        .request_payout(as_caller(
            &posted.signed.session.caller,
            pb::RequestPayoutRequest {
                creator_id: String::new(),
                amount: Some(proto::common::v1::Money {
                    minor_units: minor,
                    currency: f.currency,
                }),
                idempotency_key: f.idempotency_key,
            },
        ))
        .await?
        .into_inner();
    let paid = view::proto_money(payout.amount.as_ref()).replace(' ', "+");
    Ok(Redirect::to(&format!(
        "/creators/{creator}/payouts?done=Payout+{}+of+{paid}+booked.",
        payout.payout_id
    ))
    .into_response())
}

async fn returns(
    State(console): State<Console>,
    signed: Signed,
    Path(creator_id): Path<String>,
    Query(period): Query<Period>,
) -> PageResult {
    let creator = creator_only(&signed, &creator_id)?;
    let (from, to) = period.bounds()?;
    let mut found = Vec::new();
    let mut token = String::new();
    let mut read = 0usize;
    let truncated = loop {
        let page = get_statement(
            &console,
            &signed,
            pb::GetStatementRequest {
                creator_id: String::new(),
                from,
                to,
                page_size: STATEMENT_PAGE_MAX,
                page_token: token,
            },
        )
        .await?;
        read += page.lines.len();
        found.extend(
            page.lines
                .into_iter()
                .filter(|l| l.kind == pb::LineKind::Return as i32 || l.kind == pb::LineKind::Refund as i32),
        );
        if page.next_page_token.is_empty() {
            break false;
        }
        if read >= CONSOLE_RETURNS_SCAN_MAX {
            break true;
        }
        token = page.next_page_token;
    };
    let base = format!("/creators/{creator}/returns");
    let body = html! {
        (period_form(&base, &period, "Show"))
        @if truncated {
            p class="notice" role="status" { "Only the first " (read) " lines of this period were read: choose a shorter period to see the rest." }
        }
        @if found.is_empty() { p { "No returns or refunds in this period." } } @else {
            (table("Returns and refunds", html! {
                tr { th scope="col" { "Booked at" } th scope="col" { "Kind" } th scope="col" { "Order" }
                     th scope="col" { "Reason" } th scope="col" class="n" { "Refunded to the buyer" } th scope="col" class="n" { "Your net" } }
            }, html! {
                @for l in &found {
                    tr {
                        td { (time(l.booked_at.as_ref())) }
                        td { (kind(l.kind)) }
                        td { (l.order_id) }
                        td class="wrap" { (l.reference) }
                        td class="n" { (view::money(-l.gross, &l.currency)) }
                        td class="n" { (view::money(l.creator_net, &l.currency)) }
                    }
                }
            }))
        }
    };
    Ok(view::page("Returns and refunds", Some(&signed.session), body).into_response())
}

#[cfg(test)]
mod tests {
    use super::minor_units;

    #[test]
    fn amounts_are_read_in_the_currency_s_decimals() {
        assert_eq!(minor_units("12.5", 2), Some(1_250));
        assert_eq!(minor_units("12.50", 2), Some(1_250));
        assert_eq!(minor_units("12", 2), Some(1_200));
        assert_eq!(minor_units("1000", 0), Some(1_000));
        assert_eq!(minor_units("1.250", 3), Some(1_250));
        for bad in ["", "-1", "1.234", "1e3", "1.", ".5", "١٢", "9999999999999999"] {
            assert_eq!(minor_units(bad, 2), None, "{bad}");
        }
        assert_eq!(minor_units("1.5", 0), None);
    }
}
