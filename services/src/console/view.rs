//! The consoles' page layout and the small pieces every page uses: navigation, forms'
//! CSRF field, times and money as people read them.

use super::session::{Role, Session};
use axum::http::StatusCode;
use axum::response::Html;
use maud::{html, Markup, DOCTYPE};

/// A whole page: `title`, the navigation of the session's role (none before sign-in), `main`.
pub fn page(title: &str, session: Option<&Session>, main: Markup) -> Html<String> {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Dropline" }
                link rel="stylesheet" href="/assets/console.css";
                script src="/assets/console.js" defer {}
            }
            body {
                header class="top" {
                    a class="brand" href="/" { "Dropline" }
                    @if let Some(session) = session {
                        nav aria-label="Console" { (navigation(&session.role)) }
                        form method="post" action="/sign-out" class="sign-out" {
                            (csrf(session))
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main id="main" {
                    h1 { (title) }
                    (main)
                }
            }
        }
    };
    Html(markup.into_string())
}

fn navigation(role: &Role) -> Markup {
    match role {
        Role::Operator => html! {
            ul {
                li { a href="/operator" { "Drops" } }
                li { a href="/operator/hubs" { "Hubs" } }
                li { a href="/operator/partners" { "Partners" } }
                li { a href="/operator/orders" { "Orders" } }
            }
        },
        Role::Creator(id) => html! {
            ul {
                li { a href={ "/creators/" (id) } { "Balance" } }
                li { a href={ "/creators/" (id) "/statement" } { "Statement" } }
                li { a href={ "/creators/" (id) "/payouts" } { "Payouts" } }
                li { a href={ "/creators/" (id) "/returns" } { "Returns and refunds" } }
            }
        },
    }
}

/// The hidden CSRF field of a state-changing form.
pub fn csrf(session: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(session.csrf); }
}

pub fn failure(status: StatusCode, message: &str) -> Markup {
    html! {
        p class="failure" role="alert" { (status.as_u16()) ": " (message) }
        p { a href="/" { "Back to the console" } }
    }
}

pub fn sign_in(problem: Option<&str>) -> Markup {
    html! {
        @if let Some(problem) = problem {
            p class="failure" role="alert" { (problem) }
        }
        p { "Sign in with the operator credential or your creator credential (" code { "dlc_…" } ")." }
        form method="post" action="/sign-in" class="stack" {
            label for="credential" { "Credential" }
            input id="credential" name="credential" type="password" autocomplete="current-password" required
                maxlength=(crate::limits::CREDENTIAL_LEN_MAX);
            button type="submit" { "Sign in" }
        }
        // Filled and sent by console.js from a one-time link's fragment (`#once=…`).
        form id="once-form" method="post" action="/sign-in/once" hidden {
            input type="hidden" name="once" id="once";
        }
        p id="once-status" class="muted" aria-live="polite" {}
    }
}

/// A protobuf time as `2026-12-02 14:03:07 UTC`; "—" when unset.
pub fn time(at: Option<&prost_types::Timestamp>) -> String {
    let Some(at) = at else { return "—".into() };
    match time::OffsetDateTime::from_unix_timestamp(at.seconds) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => "—".into(),
    }
}

/// Minor units of `currency` as `12.50 EUR`.
pub fn money(minor_units: i64, currency: &str) -> String {
    format!(
        "{} {currency}",
        domain::money::format_minor_units(minor_units, domain::money::exponent_of(currency))
    )
}

pub fn proto_money(m: Option<&proto::common::v1::Money>) -> String {
    m.map_or_else(|| "—".into(), |m| money(m.minor_units, &m.currency))
}

/// An enum's protobuf name without its prefix, in lower case: `DROP_STATUS_OPEN` → `open`.
pub fn enum_word(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .replace('_', " ")
        .to_lowercase()
}

/// A notice that something was done (after a redirect, from the query string).
pub fn notice(text: Option<&str>) -> Markup {
    html! {
        @if let Some(text) = text {
            p class="notice" role="status" { (text) }
        }
    }
}
