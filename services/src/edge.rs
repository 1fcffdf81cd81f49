//! dropline.edge.v1.EdgeService: a pop-up edge's own leases, its receipt key, top-ups,
//! returns and the upload of the sales it made (see `domain::sku::lease`).
//!
//! Every call is the calling edge's (its storefront credential) about its own lease of a
//! SKU: another edge's lease is out of reach because the lease is looked up by the caller,
//! never by an id in the request. An upload's sales are checked against their receipt MAC
//! before the SKU sees them: a sale whose receipt does not verify (made up, altered, or
//! signed with another lease's key) is answered RECEIPT_INVALID and changes nothing.

use crate::auth::{require_storefront, Caller};
use crate::convert::{self, Check};
use crate::limits::EDGE_CONTACT_SHARE_MS;
use crate::platform::Platform;
use crate::status::from_command_error;
use actors::projections::ProjectionUpdate;
use actors::secrets::{receipt_mac_matches, ReceiptFields};
use domain::facts::Fulfilment;
use domain::limits::EDGE_SALES_PER_UPLOAD_MAX;
use domain::sku::{EdgeSale, EdgeSaleOutcome, EdgeUpload, LeaseView, SkuCommand, SkuState};
use domain::{DropId, OrderId, SkuId, StorefrontId};
use proto::edge::v1::edge_service_server::EdgeService;
use proto::edge::v1::*;
use tonic::{Request, Response, Status};
use tracing::info;

pub struct Edges {
    platform: Platform,
}

impl Edges {
    pub fn new(platform: Platform) -> Edges {
        Edges { platform }
    }

    /// The calling edge's lease of the SKU (NOT_FOUND when it has none), with its key.
    async fn lease(&self, edge: StorefrontId, drop_id: DropId, sku_id: SkuId) -> Result<LeaseView, Status> {
        self.platform
            .bus
            .ask_for::<SkuState, LeaseView>((drop_id, sku_id), SkuCommand::GetLease { edge })
            .await
            .map_err(from_command_error)
    }

    /// The calling edge (see [`edge`]), its contact recorded: the operator sees it online.
    fn caller<T>(&self, request: &Request<T>) -> Result<StorefrontId, Status> {
        let edge = edge(request)?;
        let projections = &self.platform.projections;
        let now = self.platform.clock.now();
        if projections.edge_contacts.record(&edge, now, EDGE_CONTACT_SHARE_MS) {
            projections.emit(vec![ProjectionUpdate::EdgeContact {
                edge: edge.clone(),
                at: now,
            }]);
        }
        Ok(edge)
    }

    fn with_key(&self, view: &LeaseView) -> EdgeLease {
        EdgeLease {
            lease: Some(convert::lease(view)),
            receipt_key: self
                .platform
                .keys
                .edge_receipt_key(view.edge.as_str(), &view.lease.key_id)
                .to_vec(),
        }
    }
}

/// The calling edge, or UNAUTHENTICATED / PERMISSION_DENIED.
fn edge<T>(request: &Request<T>) -> Result<StorefrontId, Status> {
    let caller = request
        .extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or(Caller::Anonymous);
    Ok(require_storefront(&caller)?.storefront_id.clone())
}

fn sku_of(drop_id: &str, sku_id: &str) -> Result<(DropId, SkuId), Status> {
    let mut check = Check::default();
    let drop_id = check.parse("drop_id", drop_id, DropId::parse);
    let sku_id = check.parse("sku_id", sku_id, SkuId::parse);
    check.finish(|| Some((drop_id?, sku_id?)))
}

/// An uploaded sale in the domain's terms, or the field violations it has.
fn sale(check: &mut Check, i: usize, s: &proto::edge::v1::EdgeSale) -> Option<EdgeSale> {
    let order_id = check.parse(&format!("sales[{i}].order_id"), &s.order_id, OrderId::parse);
    let amount = check.money(&format!("sales[{i}].amount"), s.amount.as_ref());
    let sold_at = check.timestamp(&format!("sales[{i}].sold_at"), s.sold_at.as_ref());
    if s.delivery {
        check.fail(
            &format!("sales[{i}].delivery"),
            "an edge's sales are handed over at its stall: an upload carries no delivery address",
        );
    }
    for (field, value) in [
        ("payment_reference", &s.payment_reference),
        ("pickup_code", &s.pickup_code),
        ("key_id", &s.key_id),
        ("receipt_mac", &s.receipt_mac),
    ] {
        check.text(&format!("sales[{i}].{field}"), value, field != "payment_reference");
    }
    Some(EdgeSale {
        order_id: order_id?,
        quantity: s.quantity,
        amount: amount?,
        fulfilment: Fulfilment::AtStall,
        payment_reference: s.payment_reference.clone(),
        pickup_code: s.pickup_code.clone(),
        receipt_mac: s.receipt_mac.clone(),
        key_id: s.key_id.clone(),
        sold_at: sold_at?,
    })
}

/// What a receipt's MAC covers, for `sale` of `drop_id`/`sku_id`.
pub(crate) fn receipt_fields<'a>(drop_id: &'a DropId, sku_id: &'a SkuId, sale: &'a EdgeSale) -> ReceiptFields<'a> {
    ReceiptFields {
        drop_id: drop_id.as_str(),
        sku_id: sku_id.as_str(),
        order_id: sale.order_id.as_str(),
        quantity: sale.quantity,
        amount_minor: sale.amount.minor_units,
        currency: sale.amount.currency.as_str(),
        delivery: sale.fulfilment == Fulfilment::Delivery,
        payment_reference: &sale.payment_reference,
        pickup_code: &sale.pickup_code,
        key_id: &sale.key_id,
        sold_at_ms: sale.sold_at.0,
    }
}

#[tonic::async_trait]
impl EdgeService for Edges {
    async fn get_lease(&self, request: Request<GetLeaseRequest>) -> Result<Response<EdgeLease>, Status> {
        let edge = self.caller(&request)?;
        let r = request.into_inner();
        let (drop_id, sku_id) = sku_of(&r.drop_id, &r.sku_id)?;
        let view = self.lease(edge, drop_id, sku_id).await?;
        Ok(Response::new(self.with_key(&view)))
    }

    async fn list_leases(
        &self,
        request: Request<ListEdgeLeasesRequest>,
    ) -> Result<Response<ListEdgeLeasesResponse>, Status> {
        let edge = self.caller(&request)?;
        let mut check = Check::default();
        let drop_id = check.parse("drop_id", &request.get_ref().drop_id, DropId::parse);
        let drop_id = check.finish(|| drop_id)?;
        let view = self.platform.drop_view(drop_id.clone()).await?;
        let asks = view.spec.skus.iter().map(|sku| {
            let key = (drop_id.clone(), sku.sku_id.clone());
            let edge = edge.clone();
            async move {
                self.platform
                    .bus
                    .ask_for::<SkuState, LeaseView>(key, SkuCommand::GetLease { edge })
                    .await
            }
        });
        let mut reply = ListEdgeLeasesResponse::default();
        for answer in futures::future::join_all(asks).await {
            match answer {
                Ok(view) => reply.leases.push(self.with_key(&view)),
                // No lease of this SKU.
                Err(actors::error::CommandError::Rejected(domain::Rejection::NotFound { .. })) => {}
                Err(e) => return Err(from_command_error(e)),
            }
        }
        Ok(Response::new(reply))
    }

    async fn top_up(&self, request: Request<TopUpRequest>) -> Result<Response<EdgeLease>, Status> {
        let edge = self.caller(&request)?;
        let r = request.into_inner();
        let (drop_id, sku_id) = sku_of(&r.drop_id, &r.sku_id)?;
        let view: LeaseView = self
            .platform
            .bus
            .ask_for::<SkuState, _>(
                (drop_id, sku_id),
                SkuCommand::TopUpLease {
                    edge,
                    granted_total: r.granted_total,
                    by_edge: true,
                },
            )
            .await
            .map_err(from_command_error)?;
        info!(drop_id = %view.drop_id, sku_id = %view.sku_id, edge = %view.edge, granted = view.lease.granted, "an edge topped its lease up");
        Ok(Response::new(self.with_key(&view)))
    }

    async fn upload(&self, request: Request<UploadRequest>) -> Result<Response<UploadResponse>, Status> {
        let edge = self.caller(&request)?;
        let r = request.into_inner();
        let mut check = Check::default();
        let drop_id = check.parse("drop_id", &r.drop_id, DropId::parse);
        let sku_id = check.parse("sku_id", &r.sku_id, SkuId::parse);
        if r.sales.len() > EDGE_SALES_PER_UPLOAD_MAX {
            check.fail("sales", format!("at most {EDGE_SALES_PER_UPLOAD_MAX} sales per upload"));
        }
        let sales: Vec<Option<EdgeSale>> = if r.sales.len() <= EDGE_SALES_PER_UPLOAD_MAX {
            r.sales
                .iter()
                .enumerate()
                .map(|(i, s)| sale(&mut check, i, s))
                .collect()
        } else {
            Vec::new()
        };
        let (drop_id, sku_id, sales) = check.finish(|| {
            let sales: Option<Vec<EdgeSale>> = sales.into_iter().collect();
            Some((drop_id?, sku_id?, sales?))
        })?;
        // The receipt key of each sale's own key id: a sale signed under an earlier lease
        // verifies, and the SKU then refuses it as sold outside this lease.
        let keys = &self.platform.keys;
        let mut verified = Vec::with_capacity(sales.len());
        let mut results: Vec<Option<SaleResult>> = Vec::with_capacity(sales.len());
        for sale in sales {
            let key = keys.edge_receipt_key(edge.as_str(), &sale.key_id);
            if receipt_mac_matches(&key, &receipt_fields(&drop_id, &sku_id, &sale), &sale.receipt_mac) {
                results.push(None);
                verified.push(sale);
            } else {
                results.push(Some(SaleResult {
                    order_id: sale.order_id.to_string(),
                    outcome: SaleOutcome::ReceiptInvalid as i32,
                    refund_reason: 0,
                }));
            }
        }
        let invalid = results.iter().filter(|r| r.is_some()).count();
        let upload: EdgeUpload = self
            .platform
            .bus
            .ask_for::<SkuState, _>(
                (drop_id.clone(), sku_id.clone()),
                SkuCommand::BookEdgeSales {
                    edge: edge.clone(),
                    sales: verified,
                },
            )
            .await
            .map_err(from_command_error)?;
        let mut booked = upload.results.into_iter();
        let results: Vec<SaleResult> = results
            .into_iter()
            .map(|result| {
                result.unwrap_or_else(|| {
                    let r = booked.next().expect("one result per verified sale");
                    let (outcome, reason) = match r.outcome {
                        EdgeSaleOutcome::Booked => (SaleOutcome::Booked, 0),
                        EdgeSaleOutcome::Refunded(reason) => {
                            (SaleOutcome::Refunded, convert::edge_refund_reason(reason) as i32)
                        }
                        EdgeSaleOutcome::Conflict => (SaleOutcome::Conflict, 0),
                    };
                    SaleResult {
                        order_id: r.order_id.to_string(),
                        outcome: outcome as i32,
                        refund_reason: reason,
                    }
                })
            })
            .collect();
        let count = |o: SaleOutcome| results.iter().filter(|r| r.outcome == o as i32).count();
        info!(
            %drop_id, %sku_id, %edge,
            booked = count(SaleOutcome::Booked),
            refunded = count(SaleOutcome::Refunded),
            conflicts = count(SaleOutcome::Conflict),
            invalid,
            "edge sales uploaded"
        );
        Ok(Response::new(UploadResponse {
            results,
            lease: Some(convert::lease(&upload.lease)),
        }))
    }

    async fn return_unsold(&self, request: Request<ReturnUnsoldRequest>) -> Result<Response<EdgeLease>, Status> {
        let edge = self.caller(&request)?;
        let r = request.into_inner();
        let (drop_id, sku_id) = sku_of(&r.drop_id, &r.sku_id)?;
        let view: LeaseView = self
            .platform
            .bus
            .ask_for::<SkuState, _>(
                (drop_id, sku_id),
                SkuCommand::ReturnLease {
                    edge,
                    returned_total: (!r.close).then_some(r.returned_total),
                },
            )
            .await
            .map_err(from_command_error)?;
        info!(drop_id = %view.drop_id, sku_id = %view.sku_id, edge = %view.edge, returned = view.lease.returned, closed = r.close, "an edge returned units");
        Ok(Response::new(self.with_key(&view)))
    }
}
