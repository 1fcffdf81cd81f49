//! `dropline settlement`: a creator's statement as a table or CSV, and reconciliation,
//! through the SettlementService of a running server.

use crate::cli::{SettlementArgs, SettlementCommand};
use proto::settlement::v1 as pb;
use proto::settlement::v1::settlement_service_client::SettlementServiceClient;
use services::auth::Bearer;
use std::io::Write;
use time::format_description::well_known::Rfc3339;
use time::{Date, OffsetDateTime, Time};

/// A period bound: a day (UTC midnight; `end` moves it to the next midnight, so the day is
/// included) or an RFC 3339 instant.
pub fn parse_bound(value: &str, end: bool) -> anyhow::Result<prost_types::Timestamp> {
    let at = if let Ok(day) = Date::parse(value, time::macros::format_description!("[year]-[month]-[day]")) {
        let day = if end {
            day.next_day()
                .ok_or_else(|| anyhow::anyhow!("{value} is the last day there is"))?
        } else {
            day
        };
        day.with_time(Time::MIDNIGHT).assume_utc()
    } else {
        OffsetDateTime::parse(value, &Rfc3339)
            .map_err(|_| anyhow::anyhow!("{value:?} is neither a day (2026-11-23) nor an RFC 3339 instant"))?
    };
    Ok(prost_types::Timestamp {
        seconds: at.unix_timestamp(),
        nanos: at.nanosecond() as i32,
    })
}

fn rfc3339(ts: Option<&prost_types::Timestamp>) -> String {
    ts.and_then(|t| OffsetDateTime::from_unix_timestamp(t.seconds).ok())
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// An amount in major units of its line's currency: `12.50` (EUR), `1000` (JPY), `1.250` (BHD).
fn amount(minor_units: i64, currency: &str) -> String {
    domain::money::format_minor_units(minor_units, domain::money::exponent_of(currency))
}

fn kind(k: i32) -> &'static str {
    match pb::LineKind::try_from(k) {
        Ok(pb::LineKind::Sale) => "sale",
        Ok(pb::LineKind::Release) => "release",
        Ok(pb::LineKind::Return) => "return",
        Ok(pb::LineKind::Refund) => "refund",
        Ok(pb::LineKind::Remedy) => "remedy",
        Ok(pb::LineKind::Payout) => "payout",
        _ => "?",
    }
}

pub async fn run(args: SettlementArgs) -> anyhow::Result<()> {
    let token = args
        .token
        .or_else(|| std::env::var("DROPLINE_OPERATOR_TOKEN").ok())
        .ok_or_else(|| anyhow::anyhow!("give a creator or operator credential with --token or DROPLINE_TOKEN"))?;
    let channel = crate::tls::endpoint(&args.server, &args.tls)?
        .connect()
        .await
        .map_err(|e| anyhow::Error::new(e).context(format!("connecting to {}", args.server)))?;
    let mut client = SettlementServiceClient::with_interceptor(channel, Bearer::new(&token)?);
    match args.command {
        SettlementCommand::Statement {
            creator,
            from,
            to,
            csv,
            output,
        } => {
            let from = from.as_deref().map(|f| parse_bound(f, false)).transpose()?;
            let to = to.as_deref().map(|t| parse_bound(t, true)).transpose()?;
            let mut lines = Vec::new();
            let mut page_token = String::new();
            let (creator_id, totals) = loop {
                let page = client
                    .get_statement(pb::GetStatementRequest {
                        creator_id: creator.clone().unwrap_or_default(),
                        from,
                        to,
                        page_size: 1_000,
                        page_token,
                    })
                    .await
                    .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
                    .into_inner();
                lines.extend(page.lines);
                page_token = page.next_page_token;
                if page_token.is_empty() {
                    break (page.creator_id, page.totals);
                }
            };
            let mut out: Box<dyn Write> = match &output {
                Some(path) => Box::new(std::io::BufWriter::new(std::fs::File::create(path)?)),
                None => Box::new(std::io::stdout().lock()),
            };
            if csv {
                write_csv(&mut out, &creator_id, &lines)?;
            } else {
                write_table(&mut out, &creator_id, from.as_ref(), to.as_ref(), &lines, &totals)?;
            }
            out.flush()?;
            if let Some(path) = output {
                eprintln!("{} lines written to {}", lines.len(), path.display());
            }
        }
        SettlementCommand::Reconcile { dry_run } => {
            let report = client
                .reconcile(pb::ReconcileRequest { dry_run })
                .await
                .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
                .into_inner();
            println!(
                "{} confirmed orders in {} SKU journals of {} drops against {} ledgers; {} in flight",
                report.orders, report.skus, report.drops, report.ledgers, report.in_flight
            );
            for d in &report.differences {
                println!(
                    "{} {} {}: {} -> {}",
                    d.creator_id, d.order_id, d.kind, d.detail, d.action
                );
            }
            println!(
                "{} differences, {} booked, {} refunded; balanced: {}",
                report.differences.len(),
                report.booked,
                report.refunded,
                if report.balanced { "yes" } else { "no" }
            );
            if !report.balanced {
                std::process::exit(2);
            }
        }
    }
    Ok(())
}

fn write_csv(out: &mut dyn Write, creator_id: &str, lines: &[pb::StatementLine]) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_writer(out);
    w.write_record(services::settlement::STATEMENT_CSV_HEADER)?;
    for l in lines {
        w.write_record([
            creator_id.to_string(),
            l.seq.to_string(),
            rfc3339(l.booked_at.as_ref()),
            kind(l.kind).to_string(),
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
    w.flush()?;
    Ok(())
}

fn write_table(
    out: &mut dyn Write,
    creator_id: &str,
    from: Option<&prost_types::Timestamp>,
    to: Option<&prost_types::Timestamp>,
    lines: &[pb::StatementLine],
    totals: &[pb::StatementTotals],
) -> anyhow::Result<()> {
    writeln!(
        out,
        "Statement of {creator_id}, {} to {}",
        from.map_or("the first line".into(), |t| rfc3339(Some(t))),
        to.map_or("now".into(), |t| rfc3339(Some(t)))
    )?;
    writeln!(
        out,
        "{:>6}  {:<20}  {:<7}  {:<34}  {:<3}  {:>10}  {:>9}  {:>9}  {:>10}  {:>8}  {:>10}  reference",
        "line", "booked at", "kind", "order", "cur", "gross", "platform", "partner", "net", "remedy", "paid out"
    )?;
    for l in lines {
        let amount = |minor_units| amount(minor_units, &l.currency);
        writeln!(
            out,
            "{:>6}  {:<20}  {:<7}  {:<34}  {:<3}  {:>10}  {:>9}  {:>9}  {:>10}  {:>8}  {:>10}  {}",
            l.seq,
            rfc3339(l.booked_at.as_ref()),
            kind(l.kind),
            l.order_id,
            l.currency,
            amount(l.gross),
            amount(l.platform_fee),
            amount(l.partner_fee),
            amount(l.creator_net),
            amount(l.remedy),
            amount(l.paid_out),
            l.reference
        )?;
    }
    for t in totals {
        let amount = |minor_units| amount(minor_units, &t.currency);
        writeln!(
            out,
            "total {}: {} lines ({} sales); gross {}, platform fees {}, partner fees {}, creator net {}, remedies {}, paid out {}",
            t.currency,
            t.lines,
            t.sales,
            amount(t.gross),
            amount(t.platform_fee),
            amount(t.partner_fee),
            amount(t.creator_net),
            amount(t.remedy),
            amount(t.paid_out)
        )?;
    }
    if totals.is_empty() {
        writeln!(out, "no lines in this period")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{parse_bound, write_table};
    use proto::settlement::v1 as pb;

    #[test]
    fn a_statement_prints_each_amount_in_its_own_currency() {
        let line = |seq, currency: &str, gross| pb::StatementLine {
            seq,
            kind: pb::LineKind::Sale as i32,
            currency: currency.into(),
            gross,
            ..Default::default()
        };
        let totals = |currency: &str, gross| pb::StatementTotals {
            currency: currency.into(),
            lines: 1,
            sales: 1,
            gross,
            ..Default::default()
        };
        let mut out = Vec::new();
        write_table(
            &mut out,
            "creator-1",
            None,
            None,
            &[line(1, "JPY", 1_000), line(2, "BHD", 1_250), line(3, "EUR", 1_000)],
            &[totals("JPY", 1_000), totals("BHD", 1_250), totals("EUR", 1_000)],
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("total JPY: 1 lines (1 sales); gross 1000,"), "{text}");
        assert!(text.contains("total BHD: 1 lines (1 sales); gross 1.250,"), "{text}");
        assert!(text.contains("total EUR: 1 lines (1 sales); gross 10.00,"), "{text}");
        let jpy_line = text.lines().find(|l| l.contains(" JPY ")).unwrap();
        assert!(jpy_line.contains(" 1000 ") && !jpy_line.contains("10.00"), "{jpy_line}");
    }

    #[test]
    fn a_day_bound_covers_the_whole_day_and_instants_are_exact() {
        assert_eq!(parse_bound("2026-11-23", false).unwrap().seconds, 1_795_392_000);
        assert_eq!(parse_bound("2026-11-23", true).unwrap().seconds, 1_795_392_000 + 86_400);
        assert_eq!(
            parse_bound("2026-11-23T10:00:00Z", true).unwrap().seconds,
            1_795_392_000 + 36_000
        );
        assert!(parse_bound("23/11/2026", false).is_err());
    }
}
