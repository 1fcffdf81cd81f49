//! `dropline lease`: the operator leases stock to pop-up edges, tops leases up, closes them
//! and lists them with the edge sales refused, through OperatorService.

use crate::cli::{LeaseArgs, LeaseCommand};
use crate::settlement_cli::parse_bound;
use proto::operator::v1 as pb;
use proto::operator::v1::operator_service_client::OperatorServiceClient;
use services::auth::Bearer;

fn status(s: i32) -> &'static str {
    match pb::LeaseStatus::try_from(s) {
        Ok(pb::LeaseStatus::Live) => "live",
        Ok(pb::LeaseStatus::Closed) => "closed",
        Ok(pb::LeaseStatus::Lapsed) => "lapsed",
        _ => "?",
    }
}

fn reason(r: i32) -> &'static str {
    match pb::EdgeRefundReason::try_from(r) {
        Ok(pb::EdgeRefundReason::SoldOutsideLease) => "sold outside the lease",
        Ok(pb::EdgeRefundReason::ReconciledTooLate) => "uploaded after the window",
        Ok(pb::EdgeRefundReason::LeaseEnded) => "lease ended before the upload",
        Ok(pb::EdgeRefundReason::LeaseExhausted) => "more than the lease held",
        Ok(pb::EdgeRefundReason::AmountMismatch) => "amount is not price x quantity",
        _ => "?",
    }
}

fn when(ts: Option<&prost_types::Timestamp>) -> String {
    ts.and_then(|t| time::OffsetDateTime::from_unix_timestamp(t.seconds).ok())
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| "-".into())
}

fn print_lease(l: &pb::Lease) {
    println!(
        "{}/{} edge {} at {} ({}): {} — {} outstanding, {} granted (top-ups to {}), {} sold, {} returned, {} refunded; key {}; expires {}, window {} s; last sync {}",
        l.drop_id,
        l.sku_id,
        l.edge_id,
        l.hub_id,
        l.city,
        status(l.status),
        l.outstanding,
        l.granted,
        l.top_up_max,
        l.sold,
        l.returned,
        l.refunded,
        l.key_id,
        when(l.expires_at.as_ref()),
        l.reconcile_window_seconds,
        when(l.last_sync.as_ref()),
    );
}

fn refused(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

pub async fn run(args: LeaseArgs) -> anyhow::Result<()> {
    let token = args
        .token
        .ok_or_else(|| anyhow::anyhow!("give the operator credential with --token or DROPLINE_OPERATOR_TOKEN"))?;
    let channel = crate::tls::endpoint(&args.server, &args.tls)?
        .connect()
        .await
        .map_err(|e| anyhow::Error::new(e).context(format!("connecting to {}", args.server)))?;
    let mut client = OperatorServiceClient::with_interceptor(channel, Bearer::new(&token)?);
    match args.command {
        LeaseCommand::Stock {
            drop_id,
            sku,
            hub,
            edge,
            quantity,
            top_up_max,
            key_id,
            expires,
            window_seconds,
        } => {
            let lease = client
                .lease_stock(pb::LeaseStockRequest {
                    drop_id,
                    sku_id: sku,
                    hub_id: hub,
                    edge_id: edge,
                    quantity,
                    top_up_max,
                    key_id,
                    expires_at: Some(parse_bound(&expires, false)?),
                    reconcile_window_seconds: window_seconds,
                })
                .await
                .map_err(refused)?
                .into_inner();
            print_lease(&lease);
        }
        LeaseCommand::TopUp {
            drop_id,
            sku,
            edge,
            granted_total,
        } => {
            let lease = client
                .top_up_lease(pb::TopUpLeaseRequest {
                    drop_id,
                    sku_id: sku,
                    edge_id: edge,
                    granted_total,
                })
                .await
                .map_err(refused)?
                .into_inner();
            print_lease(&lease);
        }
        LeaseCommand::Close { drop_id, sku, edge } => {
            let lease = client
                .close_lease(pb::CloseLeaseRequest {
                    drop_id,
                    sku_id: sku,
                    edge_id: edge,
                })
                .await
                .map_err(refused)?
                .into_inner();
            print_lease(&lease);
        }
        LeaseCommand::List { drop_id } => {
            let listed = client
                .list_leases(pb::ListLeasesRequest {
                    drop_id: drop_id.clone(),
                })
                .await
                .map_err(refused)?
                .into_inner();
            if listed.leases.is_empty() {
                println!("no leases in {drop_id}");
            }
            for lease in &listed.leases {
                print_lease(lease);
            }
            for r in &listed.refunds {
                let amount = r.amount.as_ref().map_or_else(String::new, |m| {
                    format!(
                        "{} {}",
                        domain::money::format_minor_units(m.minor_units, domain::money::exponent_of(&m.currency)),
                        m.currency
                    )
                });
                println!(
                    "refund {} (edge {}, {}): {} x{} {amount}, payment {}, sold {}",
                    r.order_id,
                    r.edge_id,
                    reason(r.reason),
                    r.sku_id,
                    r.quantity,
                    r.payment_reference,
                    when(r.sold_at.as_ref()),
                );
            }
        }
    }
    Ok(())
}
