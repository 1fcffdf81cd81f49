//! dropline.operator.v1.OperatorService: create, open, close, restock and watch drops.

use crate::auth::require_operator;
use crate::convert::{self, Check};
use crate::limits::{
    EDGE_ONLINE_WITHIN_MS, EDGE_PRESENCE_CHECK_MS, LIST_DROPS_PAGE_DEFAULT, LIST_DROPS_PAGE_MAX, LIST_DROPS_SCAN_MAX,
    WATCH_DROP_INTERVAL_MS, WATCH_STREAM_MAX_MS,
};
use crate::platform::Platform;
use crate::status::from_command_error;
use actors::hosted::announce_sale_status;
use domain::drop::{DropCommand, DropSpec, DropState, DropView, PoolSpec, SaleStatus, SettlementTerms, SkuSpec};
use domain::registry::{RegistryCommand, RegistryState, StorefrontRecord};
use domain::sku::{LeaseCommand, LeaseView, RestockCommand, SkuCommand, SkuLeases, SkuState};
use domain::{CityName, CreatorId, DropId, HubId, IdempotencyKey, SkuId, StorefrontId};
use proto::operator::v1::operator_service_server::OperatorService;
use proto::operator::v1::*;
use std::collections::HashMap;
use std::pin::Pin;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::info;

pub struct Operator {
    platform: Platform,
}

impl Operator {
    pub fn new(platform: Platform) -> Operator {
        Operator { platform }
    }

    /// Makes a storefront credential, has the registry store its hash, and shows it once.
    async fn issue_storefront_credential(
        &self,
        command: impl FnOnce(String) -> RegistryCommand,
    ) -> Result<Response<StorefrontCredential>, Status> {
        let credential = crate::auth::new_storefront_credential();
        let storefront: StorefrontRecord = self
            .platform
            .bus
            .ask_for::<RegistryState, _>((), command(crate::auth::hash(&credential)))
            .await
            .map_err(from_command_error)?;
        Ok(Response::new(StorefrontCredential {
            storefront_id: storefront.storefront_id.to_string(),
            display_name: storefront.display_name,
            credential,
        }))
    }

    /// Sends a lease command to its SKU and answers with the lease as it is after it,
    /// logging `what`.
    async fn lease_command(
        &self,
        drop_id: DropId,
        sku_id: SkuId,
        command: SkuCommand,
        what: &str,
    ) -> Result<Response<Lease>, Status> {
        let view: LeaseView = self
            .platform
            .bus
            .ask_for::<SkuState, _>((drop_id, sku_id), command)
            .await
            .map_err(from_command_error)?;
        let lease = &view.lease;
        info!(
            drop_id = %view.drop_id, sku_id = %view.sku_id, edge = %view.edge,
            granted = lease.granted, returned = lease.returned, "{what}"
        );
        Ok(Response::new(convert::lease(&view)))
    }

    async fn drop_reply(&self, view: &DropView) -> Result<Drop, Status> {
        let cached = self.platform.cached_drop(&view.spec.drop_id).await?;
        let mut drop = convert::drop_with_figures(view, &cached.skus, &hub_loads(&self.platform, &view.spec));
        edge_presence(&self.platform, &mut drop);
        Ok(drop)
    }

    /// Records a status change in the drop's journal, then tells the running SKU actors.
    async fn set_status(
        &self,
        drop_id: &str,
        command: DropCommand,
        status: SaleStatus,
    ) -> Result<Response<Drop>, Status> {
        let drop_id = parse_drop_id(drop_id)?;
        let view = self
            .platform
            .bus
            .ask::<DropState>(drop_id.clone(), command)
            .await
            .map_err(from_command_error)?;
        announce_sale_status(&*self.platform.bus, &view.spec, status)
            .await
            .map_err(from_command_error)?;
        info!(%drop_id, ?status, "drop status changed");
        Ok(Response::new(self.drop_reply(&view).await?))
    }
}

impl Operator {
    /// A drop as ListDrops shows it: from the drop cache when this process has seen the
    /// drop, else from its actor (which then publishes it to the cache).
    async fn drop_summary(&self, drop_id: DropId) -> Result<DropSummary, Status> {
        let (spec, recorded) = match self.platform.projections.availability.get(&drop_id) {
            Some(cached) => (cached.spec, cached.status),
            None => {
                let view = self.platform.drop_view(drop_id).await?;
                (view.spec, view.recorded_status)
            }
        };
        let status = recorded.effective(spec.opens_at, spec.closes_at, self.platform.clock.now());
        let hubs: std::collections::BTreeSet<&HubId> = spec
            .skus
            .iter()
            .flat_map(|s| s.pools.iter().map(|p| &p.hub_id))
            .collect();
        Ok(DropSummary {
            drop_id: spec.drop_id.to_string(),
            creator_id: spec.creator_id.to_string(),
            title: spec.title.clone(),
            status: convert::drop_status(status) as i32,
            opens_at: Some(convert::timestamp(spec.opens_at)),
            closes_at: Some(convert::timestamp(spec.closes_at)),
            skus: spec.skus.len() as u32,
            hubs: hubs.len() as u32,
            allocated: spec
                .skus
                .iter()
                .flat_map(|s| s.pools.iter().map(|p| u64::from(p.allocated)))
                .sum(),
        })
    }
}

/// The load of every hub a drop sells from, as far as the hubs have published it.
fn hub_loads(platform: &Platform, spec: &DropSpec) -> Vec<actors::fulfilment::HubLoad> {
    let hubs: std::collections::BTreeSet<&HubId> = spec
        .skus
        .iter()
        .flat_map(|s| s.pools.iter().map(|p| &p.hub_id))
        .collect();
    hubs.into_iter()
        .filter_map(|h| platform.projections.hub_loads.get(h))
        .collect()
}

/// Every pool must be fulfilled by a registered hub in the pool's city.
fn check_hubs(platform: &Platform, spec: &DropSpec) -> Result<(), Status> {
    let mut violations = Vec::new();
    for (i, sku) in spec.skus.iter().enumerate() {
        for (j, pool) in sku.pools.iter().enumerate() {
            match platform.projections.directory.hub(&pool.hub_id) {
                None => violations.push(domain::FieldViolation::new(
                    format!("skus[{i}].allocations[{j}].hub_id"),
                    format!("no hub {} in the registry (CreateHub first)", pool.hub_id),
                )),
                Some(hub) if hub.spec.city != pool.city => violations.push(domain::FieldViolation::new(
                    format!("skus[{i}].allocations[{j}].city"),
                    format!("hub {} is in {}, not {}", pool.hub_id, hub.spec.city, pool.city),
                )),
                Some(_) => {}
            }
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(crate::status::invalid_argument(violations))
    }
}

fn parse_drop_id(value: &str) -> Result<DropId, Status> {
    let mut check = Check::default();
    let id = check.parse("drop_id", value, DropId::parse);
    check.finish(|| id)
}

fn drop_spec(r: CreateDropRequest) -> Result<DropSpec, Status> {
    let mut check = Check::default();
    let drop_id = check.parse("drop_id", &r.drop_id, DropId::parse);
    let creator_id = check.parse("creator_id", &r.creator_id, CreatorId::parse);
    check.text("title", &r.title, false);
    let opens_at = check.timestamp("opens_at", r.opens_at.as_ref());
    let closes_at = check.timestamp("closes_at", r.closes_at.as_ref());
    let mut skus = Vec::with_capacity(r.skus.len().min(domain::limits::SKUS_PER_DROP_MAX));
    // The same few hubs and cities recur in every SKU's pools: parsed once each, then shared.
    let mut hubs: HashMap<&str, HubId> = HashMap::new();
    let mut cities: HashMap<&str, CityName> = HashMap::new();
    for (i, sku) in r.skus.iter().enumerate().take(domain::limits::SKUS_PER_DROP_MAX + 1) {
        let sku_id = check.parse(&format!("skus[{i}].sku_id"), &sku.sku_id, SkuId::parse);
        let price = check.money(&format!("skus[{i}].price"), sku.price.as_ref());
        let mut pools = Vec::new();
        for (j, a) in sku
            .allocations
            .iter()
            .enumerate()
            .take(domain::limits::POOLS_PER_SKU_MAX + 1)
        {
            let hub_id = check.parse_shared(
                &mut hubs,
                &format!("skus[{i}].allocations[{j}].hub_id"),
                &a.hub_id,
                HubId::parse,
            );
            let city = check.parse_shared(
                &mut cities,
                &format!("skus[{i}].allocations[{j}].city"),
                &a.city,
                CityName::parse,
            );
            if let (Some(hub_id), Some(city)) = (hub_id, city) {
                pools.push(PoolSpec {
                    hub_id,
                    city,
                    allocated: a.quantity,
                });
            }
        }
        if let (Some(sku_id), Some(price)) = (sku_id, price) {
            skus.push(SkuSpec {
                sku_id,
                name: sku.name.clone(),
                price,
                per_buyer_limit: sku.per_buyer_limit,
                pools,
            });
        }
    }
    let spec = check.finish(|| {
        Some(DropSpec {
            drop_id: drop_id?,
            creator_id: creator_id?,
            title: r.title.clone(),
            opens_at: opens_at?,
            closes_at: closes_at?,
            hold_ttl_ms: u64::from(r.hold_ttl_seconds) * 1_000,
            skus,
            terms: r.settlement.map_or_else(SettlementTerms::default, |t| SettlementTerms {
                platform_fee_bps: t.platform_fee_bps,
                delivery_fee_minor_units: t.delivery_fee_minor_units,
                return_window_ms: u64::from(t.return_window_seconds) * 1_000,
            }),
        })
    })?;
    // The spec's own rules (windows, prices, limits, duplicates) live in the domain.
    let violations = spec.violations();
    if !violations.is_empty() {
        return Err(crate::status::invalid_argument(violations));
    }
    Ok(spec)
}

type DropStream = Pin<Box<dyn Stream<Item = Result<Drop, Status>> + Send>>;

#[tonic::async_trait]
impl OperatorService for Operator {
    async fn create_drop(&self, request: Request<CreateDropRequest>) -> Result<Response<Drop>, Status> {
        require_operator(&request)?;
        let spec = drop_spec(request.into_inner())?;
        check_hubs(&self.platform, &spec)?;
        let drop_id = spec.drop_id.clone();
        let skus = spec.skus.len();
        let view = self
            .platform
            .bus
            .ask::<DropState>(drop_id.clone(), DropCommand::Create(spec))
            .await
            .map_err(from_command_error)?;
        info!(%drop_id, skus, "drop created");
        Ok(Response::new(self.drop_reply(&view).await?))
    }

    async fn open_drop(&self, request: Request<OpenDropRequest>) -> Result<Response<Drop>, Status> {
        require_operator(&request)?;
        self.set_status(&request.into_inner().drop_id, DropCommand::Open, SaleStatus::Open)
            .await
    }

    async fn close_drop(&self, request: Request<CloseDropRequest>) -> Result<Response<Drop>, Status> {
        require_operator(&request)?;
        self.set_status(&request.into_inner().drop_id, DropCommand::Close, SaleStatus::Closed)
            .await
    }

    async fn restock(&self, request: Request<RestockRequest>) -> Result<Response<SkuFigures>, Status> {
        require_operator(&request)?;
        let r = request.into_inner();
        let mut check = Check::default();
        let drop_id = check.parse("drop_id", &r.drop_id, DropId::parse);
        let sku_id = check.parse("sku_id", &r.sku_id, SkuId::parse);
        let hub_id = check.parse("hub_id", &r.hub_id, HubId::parse);
        let city = check.optional("city", &r.city, CityName::parse);
        let key = check.optional("idempotency_key", &r.idempotency_key, IdempotencyKey::parse);
        if r.quantity == 0 {
            check.fail("quantity", "must be at least 1");
        }
        let (drop_id, sku_id, hub_id) = check.finish(|| Some((drop_id?, sku_id?, hub_id?)))?;
        let command = RestockCommand {
            hub_id,
            city,
            quantity: r.quantity,
            idempotency_key: key,
        };
        let figures: domain::sku::SkuFigures = self
            .platform
            .bus
            .ask_for::<SkuState, _>((drop_id.clone(), sku_id.clone()), SkuCommand::Restock(command))
            .await
            .map_err(from_command_error)?;
        info!(%drop_id, %sku_id, quantity = r.quantity, "restocked");
        Ok(Response::new(convert::sku_figures(&figures)))
    }

    async fn get_drop(&self, request: Request<GetDropRequest>) -> Result<Response<Drop>, Status> {
        require_operator(&request)?;
        let drop_id = parse_drop_id(&request.into_inner().drop_id)?;
        let view = self.platform.drop_view(drop_id).await?;
        Ok(Response::new(self.drop_reply(&view).await?))
    }

    type WatchDropStream = DropStream;

    async fn watch_drop(&self, request: Request<WatchDropRequest>) -> Result<Response<DropStream>, Status> {
        require_operator(&request)?;
        let drop_id = parse_drop_id(&request.into_inner().drop_id)?;
        let mut changes = self.platform.projections.availability.subscribe();
        let view = self
            .platform
            .bus
            .ask::<DropState>(drop_id.clone(), DropCommand::Get)
            .await
            .map_err(from_command_error)?;
        let first = self.drop_reply(&view).await?;
        let platform = self.platform.clone();
        let mut shutdown = platform.shutdown.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let deadline = tokio::time::sleep(Duration::from_millis(WATCH_STREAM_MAX_MS));
            tokio::pin!(deadline);
            let mut last = first.clone();
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { break },
                    // Edges go offline by falling silent: look again now and then.
                    _ = tokio::time::sleep(Duration::from_millis(EDGE_PRESENCE_CHECK_MS)), if has_edges(&last) => {}
                    _ = tx.closed() => break,
                    _ = shutdown.changed() => break,
                    _ = &mut deadline => break,
                }
                // Coalesce: at most one update per interval however busy the drop is.
                tokio::time::sleep(Duration::from_millis(WATCH_DROP_INTERVAL_MS)).await;
                changes.borrow_and_update();
                let Some(cached) = platform.projections.availability.get(&drop_id) else {
                    continue;
                };
                let now = platform.clock.now();
                let view = DropView {
                    status: cached
                        .status
                        .effective(cached.spec.opens_at, cached.spec.closes_at, now),
                    recorded_status: cached.status,
                    spec: cached.spec.clone(),
                };
                let mut next = convert::drop_with_figures(&view, &cached.skus, &hub_loads(&platform, &view.spec));
                edge_presence(&platform, &mut next);
                if next != last {
                    last = next.clone();
                    if tx.send(Ok(next)).await.is_err() {
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_drops(&self, request: Request<ListDropsRequest>) -> Result<Response<ListDropsResponse>, Status> {
        require_operator(&request)?;
        let r = request.into_inner();
        let mut check = Check::default();
        let after = check.optional("page_token", &r.page_token, DropId::parse);
        let wanted = match DropStatus::try_from(r.status) {
            Ok(DropStatus::Unspecified) => None,
            Ok(status) => Some(status),
            Err(_) => {
                check.fail("status", "unknown drop status");
                None
            }
        };
        if r.page_size > LIST_DROPS_PAGE_MAX {
            check.fail("page_size", format!("must be at most {LIST_DROPS_PAGE_MAX}"));
        }
        check.finish(|| Some(()))?;
        let page_size = if r.page_size == 0 {
            LIST_DROPS_PAGE_DEFAULT
        } else {
            r.page_size
        } as usize;
        // Unfiltered, a page reads exactly the drops it returns; filtered, up to the scan
        // bound, stopping once the page is full.
        let scan = if wanted.is_none() {
            page_size
        } else {
            LIST_DROPS_SCAN_MAX
        };
        let mut cursor = after.map(|id| <DropState as actors::hosted::Hosted>::stream(&id));
        let mut drops = Vec::new();
        let mut scanned = 0;
        let mut exhausted = false;
        while drops.len() < page_size && scanned < scan {
            let want = (scan - scanned).min(page_size - drops.len()).max(1);
            let streams = self
                .platform
                .journal
                .streams("drop/", cursor.as_deref(), want)
                .await
                .map_err(|e| Status::unavailable(format!("reading the journal: {e}; nothing was changed, retry")))?;
            exhausted = streams.len() < want;
            for stream in streams {
                scanned += 1;
                let Some(drop_id) = stream.strip_prefix("drop/").and_then(|id| DropId::parse(id).ok()) else {
                    cursor = Some(stream);
                    continue;
                };
                let summary = self.drop_summary(drop_id).await?;
                cursor = Some(stream);
                if wanted.is_none_or(|w| summary.status == w as i32) {
                    drops.push(summary);
                }
            }
            if exhausted {
                break;
            }
        }
        let next_page_token = match (exhausted, cursor) {
            (false, Some(stream)) => stream.strip_prefix("drop/").unwrap_or_default().to_string(),
            _ => String::new(),
        };
        Ok(Response::new(ListDropsResponse { drops, next_page_token }))
    }

    async fn register_storefront(
        &self,
        request: Request<RegisterStorefrontRequest>,
    ) -> Result<Response<StorefrontCredential>, Status> {
        require_operator(&request)?;
        let r = request.into_inner();
        let mut check = Check::default();
        let storefront_id = check.parse("storefront_id", &r.storefront_id, StorefrontId::parse);
        check.text("display_name", &r.display_name, true);
        let storefront_id = check.finish(|| storefront_id)?;
        info!(%storefront_id, "storefront registered");
        self.issue_storefront_credential(|credential_hash| RegistryCommand::RegisterStorefront {
            storefront_id,
            display_name: r.display_name,
            credential_hash,
        })
        .await
    }

    async fn reset_storefront_credential(
        &self,
        request: Request<ResetStorefrontCredentialRequest>,
    ) -> Result<Response<StorefrontCredential>, Status> {
        require_operator(&request)?;
        let mut check = Check::default();
        let storefront_id = check.parse("storefront_id", &request.get_ref().storefront_id, StorefrontId::parse);
        let storefront_id = check.finish(|| storefront_id)?;
        info!(%storefront_id, "storefront credential replaced");
        self.issue_storefront_credential(|credential_hash| RegistryCommand::ResetStorefrontCredential {
            storefront_id,
            credential_hash,
        })
        .await
    }

    async fn lease_stock(&self, request: Request<LeaseStockRequest>) -> Result<Response<Lease>, Status> {
        require_operator(&request)?;
        let r = request.into_inner();
        let mut check = Check::default();
        let drop_id = check.parse("drop_id", &r.drop_id, DropId::parse);
        let sku_id = check.parse("sku_id", &r.sku_id, SkuId::parse);
        let hub_id = check.parse("hub_id", &r.hub_id, HubId::parse);
        let edge = check.parse("edge_id", &r.edge_id, StorefrontId::parse);
        let expires_at = check.timestamp("expires_at", r.expires_at.as_ref());
        let (drop_id, sku_id, hub_id, edge, expires_at) =
            check.finish(|| Some((drop_id?, sku_id?, hub_id?, edge?, expires_at?)))?;
        // The edge sells with a storefront credential: it must be one.
        let directory: domain::registry::Directory = self
            .platform
            .bus
            .ask_for::<RegistryState, _>((), RegistryCommand::Directory)
            .await
            .map_err(from_command_error)?;
        if !directory.storefronts.iter().any(|s| s.storefront_id == edge) {
            return Err(Status::not_found(format!(
                "no storefront {edge}: register the edge as a storefront first"
            )));
        }
        let window_ms = match r.reconcile_window_seconds {
            0 => domain::limits::RECONCILE_WINDOW_MS_DEFAULT,
            seconds => u64::from(seconds) * 1_000,
        };
        let command = LeaseCommand {
            edge,
            hub_id,
            quantity: r.quantity,
            granted_max: r.top_up_max,
            key_id: r.key_id,
            expires_at,
            reconcile_window_ms: window_ms,
        };
        self.lease_command(drop_id, sku_id, SkuCommand::Lease(command), "stock leased to an edge")
            .await
    }

    async fn top_up_lease(&self, request: Request<TopUpLeaseRequest>) -> Result<Response<Lease>, Status> {
        require_operator(&request)?;
        let r = request.into_inner();
        let (drop_id, sku_id, edge) = lease_of(&r.drop_id, &r.sku_id, &r.edge_id)?;
        let command = SkuCommand::TopUpLease {
            edge,
            granted_total: r.granted_total,
            by_edge: false,
        };
        self.lease_command(drop_id, sku_id, command, "lease topped up").await
    }

    async fn close_lease(&self, request: Request<CloseLeaseRequest>) -> Result<Response<Lease>, Status> {
        require_operator(&request)?;
        let r = request.into_inner();
        let (drop_id, sku_id, edge) = lease_of(&r.drop_id, &r.sku_id, &r.edge_id)?;
        let command = SkuCommand::ReturnLease {
            edge,
            returned_total: None,
        };
        self.lease_command(drop_id, sku_id, command, "lease closed").await
    }

    async fn list_leases(&self, request: Request<ListLeasesRequest>) -> Result<Response<ListLeasesResponse>, Status> {
        require_operator(&request)?;
        let drop_id = parse_drop_id(&request.into_inner().drop_id)?;
        let view = self.platform.drop_view(drop_id.clone()).await?;
        let asks = view.spec.skus.iter().map(|sku| {
            let key = (drop_id.clone(), sku.sku_id.clone());
            async move {
                self.platform
                    .bus
                    .ask_for::<SkuState, SkuLeases>(key, SkuCommand::GetLeases)
                    .await
                    .map(|leases| (sku.sku_id.clone(), leases))
            }
        });
        let mut reply = ListLeasesResponse::default();
        for answer in futures::future::join_all(asks).await {
            let (sku_id, leases) = answer.map_err(from_command_error)?;
            reply.leases.extend(leases.leases.iter().map(convert::lease));
            reply.refunds.extend(
                leases
                    .refunds
                    .iter()
                    .map(|refund| convert::edge_refund(&sku_id, refund)),
            );
        }
        Ok(Response::new(reply))
    }
}

/// Adds to each edge's figures when it last called the platform and whether that is recent
/// enough to call it online.
fn edge_presence(platform: &Platform, drop: &mut Drop) {
    let now = platform.clock.now();
    for edge in drop.skus.iter_mut().flat_map(|s| s.edges.iter_mut()) {
        let Ok(id) = StorefrontId::parse(&edge.edge_id) else {
            continue;
        };
        let contact = platform.projections.edge_contacts.get(&id);
        edge.last_contact = contact.map(convert::timestamp);
        edge.online = contact.is_some_and(|at| now.0.saturating_sub(at.0) <= EDGE_ONLINE_WITHIN_MS);
    }
}

fn has_edges(drop: &Drop) -> bool {
    drop.skus.iter().any(|s| !s.edges.is_empty())
}

/// A lease's drop, SKU and edge from a request, or INVALID_ARGUMENT naming the bad fields.
fn lease_of(drop_id: &str, sku_id: &str, edge_id: &str) -> Result<(DropId, SkuId, StorefrontId), Status> {
    let mut check = Check::default();
    let drop_id = check.parse("drop_id", drop_id, DropId::parse);
    let sku_id = check.parse("sku_id", sku_id, SkuId::parse);
    let edge = check.parse("edge_id", edge_id, StorefrontId::parse);
    check.finish(|| Some((drop_id?, sku_id?, edge?)))
}
