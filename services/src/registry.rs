//! dropline.registry.v1.PartnerRegistryService: hubs and partners, for operators (a partner
//! may read its own record), and the audit trail.

use crate::auth::{self, require_operator, require_operator_or_partner};
use crate::convert::{duration, timestamp, Check};
use crate::platform::Platform;
use crate::status::from_command_error;
use actors::audit_log::{AuditEntry, AuditSubject};
use domain::hub::{HubCommand, HubState, HubView, PartnerStats};
use domain::registry::{
    Capability, HubRecord, HubSpec, PartnerKind, PartnerRecord, PartnerSpec, PartnerStatus, RegistryCommand,
    RegistryReply, RegistryState, SlaTargets, StatusSource,
};
use domain::reply::FromReply;
use domain::{CityName, HubId, PartnerId};
use proto::registry::v1 as pb;
use proto::registry::v1::partner_registry_service_server::PartnerRegistryService;
use std::collections::BTreeSet;
use tonic::{Request, Response, Status};
use tracing::info;

/// Defaults of optional hub policy fields and partner limits.
pub const DEFAULT_PROBATION_SHARE_PERCENT: u32 = 20;
pub const DEFAULT_PROBATION_EXIT_DELIVERIES: u32 = 5;
pub const DEFAULT_LATE_CREDIT_PERCENT: u32 = 10;
pub const DEFAULT_GIVE_UP_AFTER_MS: u64 = 12 * 3_600_000;
pub const DEFAULT_MAX_OPEN_DISPATCHES: u32 = 10;
/// Page sizes of list calls.
pub const PAGE_SIZE_DEFAULT: usize = 100;
pub const PAGE_SIZE_MAX: usize = 1_000;

pub struct Registry {
    platform: Platform,
}

impl Registry {
    pub fn new(platform: Platform) -> Registry {
        Registry { platform }
    }

    /// A registry command, its reply in the shape `T` it answers with.
    async fn command<T: FromReply<RegistryReply>>(&self, command: RegistryCommand) -> Result<T, Status> {
        self.platform
            .bus
            .ask_for::<RegistryState, T>((), command)
            .await
            .map_err(from_command_error)
    }

    /// A registry command whose reply is a partner.
    async fn partner_command(&self, command: RegistryCommand) -> Result<PartnerRecord, Status> {
        self.command(command).await
    }

    /// A registry command whose reply is a hub.
    async fn hub_command(&self, command: RegistryCommand) -> Result<HubRecord, Status> {
        self.command(command).await
    }

    async fn partner_reply(&self, command: RegistryCommand) -> Result<Response<pb::Partner>, Status> {
        let record = self.partner_command(command).await?;
        Ok(Response::new(self.partner_with_metrics(&record).await))
    }

    /// A partner with its SLA metrics from each hub it serves (hubs that cannot answer now
    /// are shown without metrics rather than failing the call).
    async fn partner_with_metrics(&self, record: &PartnerRecord) -> pb::Partner {
        let mut partner = partner(record);
        for (assignment, hub_id) in partner.hubs.iter_mut().zip(record.hubs.keys()) {
            if let Ok(view) = self.hub_view(hub_id).await {
                assignment.metrics = view
                    .partners
                    .iter()
                    .find(|p| p.roster.partner_id == record.spec.partner_id)
                    .map(|p| metrics(&p.stats));
            }
        }
        partner
    }

    async fn hub_view(&self, hub_id: &HubId) -> Result<HubView, Status> {
        self.platform
            .bus
            .ask_for::<HubState, HubView>(hub_id.clone(), HubCommand::Get)
            .await
            .map_err(from_command_error)
    }
}

fn parse_partner_id(check: &mut Check, field: &str, value: &str) -> Option<PartnerId> {
    check.parse(field, value, PartnerId::parse)
}

fn kind_from(check: &mut Check, value: i32) -> Option<PartnerKind> {
    match pb::PartnerKind::try_from(value) {
        Ok(pb::PartnerKind::Courier) => Some(PartnerKind::Courier),
        Ok(pb::PartnerKind::Locker) => Some(PartnerKind::Locker),
        Ok(pb::PartnerKind::Shop) => Some(PartnerKind::Shop),
        _ => {
            check.fail("kind", "must be COURIER, LOCKER or SHOP");
            None
        }
    }
}

fn capability_from(value: i32) -> Option<Capability> {
    match pb::Capability::try_from(value) {
        Ok(pb::Capability::Delivery) => Some(Capability::Delivery),
        Ok(pb::Capability::PickupPoint) => Some(Capability::PickupPoint),
        Ok(pb::Capability::Discreet) => Some(Capability::Discreet),
        _ => None,
    }
}

fn capabilities_from(check: &mut Check, values: &[i32]) -> BTreeSet<Capability> {
    let mut out = BTreeSet::new();
    for (i, v) in values.iter().enumerate() {
        match capability_from(*v) {
            Some(c) => {
                out.insert(c);
            }
            None => check.fail(&format!("capabilities[{i}]"), "unknown capability"),
        }
    }
    if values.is_empty() {
        check.fail("capabilities", "must name at least one capability");
    }
    out
}

fn status_from(value: i32) -> Option<PartnerStatus> {
    match pb::PartnerStatus::try_from(value) {
        Ok(pb::PartnerStatus::Probation) => Some(PartnerStatus::Probation),
        Ok(pb::PartnerStatus::Active) => Some(PartnerStatus::Active),
        Ok(pb::PartnerStatus::Suspended) => Some(PartnerStatus::Suspended),
        _ => None,
    }
}

pub fn status_to(status: PartnerStatus) -> pb::PartnerStatus {
    match status {
        PartnerStatus::Probation => pb::PartnerStatus::Probation,
        PartnerStatus::Active => pb::PartnerStatus::Active,
        PartnerStatus::Suspended => pb::PartnerStatus::Suspended,
    }
}

fn capability_to(c: Capability) -> pb::Capability {
    match c {
        Capability::Delivery => pb::Capability::Delivery,
        Capability::PickupPoint => pb::Capability::PickupPoint,
        Capability::Discreet => pb::Capability::Discreet,
    }
}

fn partner_spec(
    partner_id: &str,
    name: &str,
    kind: i32,
    capabilities: &[i32],
    max_open_dispatches: u32,
) -> Result<PartnerSpec, Status> {
    let mut check = Check::default();
    let partner_id = parse_partner_id(&mut check, "partner_id", partner_id);
    check.text("name", name, true);
    let kind = kind_from(&mut check, kind);
    let capabilities = capabilities_from(&mut check, capabilities);
    let spec = check.finish(|| {
        Some(PartnerSpec {
            partner_id: partner_id?,
            name: name.to_string(),
            kind: kind?,
            capabilities,
            max_open_dispatches: if max_open_dispatches == 0 {
                DEFAULT_MAX_OPEN_DISPATCHES
            } else {
                max_open_dispatches
            },
        })
    })?;
    let violations = spec.violations();
    if !violations.is_empty() {
        return Err(crate::status::invalid_argument(violations));
    }
    Ok(spec)
}

fn hub_spec(spec: Option<&pb::HubSpec>) -> Result<HubSpec, Status> {
    let mut check = Check::default();
    let Some(s) = spec else {
        check.fail("hub", "is required");
        return check.finish(|| None);
    };
    let hub_id = check.parse("hub.hub_id", &s.hub_id, HubId::parse);
    let city = check.parse("hub.city", &s.city, CityName::parse);
    check.text("hub.name", &s.name, false);
    let location = s.location.unwrap_or_default();
    if !location.latitude.is_finite() || !location.longitude.is_finite() {
        check.fail("hub.location", "must be finite coordinates");
    }
    let sla = s.sla.unwrap_or_default();
    let accept = check.duration("hub.sla.accept_within", sla.accept_within.as_ref());
    let pickup = check.duration("hub.sla.pickup_within", sla.pickup_within.as_ref());
    let deliver = check.duration("hub.sla.deliver_within", sla.deliver_within.as_ref());
    let give_up = match &s.give_up_after {
        None => Some(DEFAULT_GIVE_UP_AFTER_MS),
        Some(d) => check.duration("hub.give_up_after", Some(d)),
    };
    let or = |v: u32, default: u32| if v == 0 { default } else { v };
    let spec = check.finish(|| {
        Some(HubSpec {
            hub_id: hub_id?,
            name: s.name.clone(),
            city: city?,
            latitude_e6: (location.latitude * 1e6).round() as i32,
            longitude_e6: (location.longitude * 1e6).round() as i32,
            slot_ms: u64::from(s.slot_minutes) * 60_000,
            slot_capacity: s.capacity_per_slot,
            sla: SlaTargets {
                accept_ms: accept?,
                pickup_ms: pickup?,
                deliver_ms: deliver?,
            },
            probation_share_percent: or(s.probation_share_percent, DEFAULT_PROBATION_SHARE_PERCENT),
            probation_exit_deliveries: or(s.probation_exit_deliveries, DEFAULT_PROBATION_EXIT_DELIVERIES),
            late_credit_percent: or(s.late_credit_percent, DEFAULT_LATE_CREDIT_PERCENT),
            give_up_after_ms: give_up?,
        })
    })?;
    let violations: Vec<_> = spec
        .violations()
        .into_iter()
        .map(|mut v| {
            v.field = format!("hub.{}", v.field);
            v
        })
        .collect();
    if !violations.is_empty() {
        return Err(crate::status::invalid_argument(violations));
    }
    Ok(spec)
}

fn hub_spec_to(spec: &HubSpec) -> pb::HubSpec {
    pb::HubSpec {
        hub_id: spec.hub_id.to_string(),
        name: spec.name.clone(),
        city: spec.city.to_string(),
        location: Some(pb::Location {
            latitude: f64::from(spec.latitude_e6) / 1e6,
            longitude: f64::from(spec.longitude_e6) / 1e6,
        }),
        slot_minutes: (spec.slot_ms / 60_000) as u32,
        capacity_per_slot: spec.slot_capacity,
        sla: Some(pb::SlaTargets {
            accept_within: Some(duration(spec.sla.accept_ms)),
            pickup_within: Some(duration(spec.sla.pickup_ms)),
            deliver_within: Some(duration(spec.sla.deliver_ms)),
        }),
        probation_share_percent: spec.probation_share_percent,
        probation_exit_deliveries: spec.probation_exit_deliveries,
        late_credit_percent: spec.late_credit_percent,
        give_up_after: Some(duration(spec.give_up_after_ms)),
    }
}

fn hub_record(record: &HubRecord) -> pb::Hub {
    pb::Hub {
        spec: Some(hub_spec_to(&record.spec)),
        created_at: Some(timestamp(record.created_at)),
        updated_at: Some(timestamp(record.updated_at)),
        ..Default::default()
    }
}

fn hub_with_view(record: &HubRecord, view: &HubView) -> pb::Hub {
    pb::Hub {
        open_dispatches: view.open,
        waiting_for_partner: view.waiting,
        delivered: view.delivered,
        failed: view.failed,
        swaps: view.swaps,
        throttled: view.throttled,
        next_promise_from: Some(timestamp(view.next_promise.0)),
        next_promise_by: Some(timestamp(view.next_promise.1)),
        partners: view
            .partners
            .iter()
            .map(|p| pb::HubPartner {
                partner_id: p.roster.partner_id.to_string(),
                rank: p.roster.rank,
                status: status_to(p.roster.status) as i32,
                metrics: Some(metrics(&p.stats)),
            })
            .collect(),
        alerts: view
            .alerts
            .iter()
            .map(|a| pb::Alert {
                at: Some(timestamp(a.at)),
                order_id: a.order_id.as_ref().map(ToString::to_string).unwrap_or_default(),
                partner_id: a.partner_id.as_ref().map(ToString::to_string).unwrap_or_default(),
                message: a.message.clone(),
            })
            .collect(),
        ..hub_record(record)
    }
}

pub fn metrics(s: &PartnerStats) -> pb::SlaMetrics {
    pb::SlaMetrics {
        offers: s.offers,
        accepted: s.accepted,
        declined: s.declined,
        missed_accept: s.missed_accept,
        missed_pickup: s.missed_pickup,
        failures: s.failures,
        delivered: s.delivered,
        delivered_on_time: s.delivered_on_time,
        score_bps: s.score_bps(),
        open_dispatches: s.open,
        probation_on_time: s.probation_on_time,
    }
}

pub fn partner(record: &PartnerRecord) -> pb::Partner {
    pb::Partner {
        partner_id: record.spec.partner_id.to_string(),
        name: record.spec.name.clone(),
        kind: match record.spec.kind {
            PartnerKind::Courier => pb::PartnerKind::Courier,
            PartnerKind::Locker => pb::PartnerKind::Locker,
            PartnerKind::Shop => pb::PartnerKind::Shop,
        } as i32,
        capabilities: record
            .spec
            .capabilities
            .iter()
            .map(|c| capability_to(*c) as i32)
            .collect(),
        max_open_dispatches: record.spec.max_open_dispatches,
        status: status_to(record.status) as i32,
        status_source: match &record.status_source {
            StatusSource::Registration => "registration".into(),
            StatusSource::Operator => "operator".into(),
            StatusSource::Hub(h) => format!("hub:{h}"),
        },
        status_reason: record.status_reason.clone(),
        hubs: record
            .hubs
            .iter()
            .map(|(hub_id, rank)| pb::HubAssignment {
                hub_id: hub_id.to_string(),
                rank: *rank,
                metrics: None,
            })
            .collect(),
        registered_at: Some(timestamp(record.registered_at)),
        updated_at: Some(timestamp(record.updated_at)),
    }
}

fn audit_entry(e: &AuditEntry) -> pb::AuditEntry {
    pb::AuditEntry {
        at: Some(timestamp(e.at)),
        action: e.action.clone(),
        order_id: e.order_id.clone().unwrap_or_default(),
        partner_id: e.partner_id.clone().unwrap_or_default(),
        hub_id: e.hub_id.clone().unwrap_or_default(),
        detail: e.detail.clone(),
    }
}

fn page_size(requested: u32) -> usize {
    match requested as usize {
        0 => PAGE_SIZE_DEFAULT,
        n => n.min(PAGE_SIZE_MAX),
    }
}

#[tonic::async_trait]
impl PartnerRegistryService for Registry {
    async fn register_partner(
        &self,
        request: Request<pb::RegisterPartnerRequest>,
    ) -> Result<Response<pb::RegisterPartnerResponse>, Status> {
        require_operator(&request)?;
        let r = request.into_inner();
        let spec = partner_spec(&r.partner_id, &r.name, r.kind, &r.capabilities, r.max_open_dispatches)?;
        let credential = auth::new_partner_credential();
        let record = self
            .partner_command(RegistryCommand::RegisterPartner {
                spec,
                credential_hash: auth::hash(&credential),
            })
            .await?;
        info!(partner_id = %record.spec.partner_id, "partner registered");
        Ok(Response::new(pb::RegisterPartnerResponse {
            partner: Some(partner(&record)),
            credential,
        }))
    }

    async fn update_partner(
        &self,
        request: Request<pb::UpdatePartnerRequest>,
    ) -> Result<Response<pb::Partner>, Status> {
        require_operator(&request)?;
        let r = request.into_inner();
        let spec = partner_spec(&r.partner_id, &r.name, r.kind, &r.capabilities, r.max_open_dispatches)?;
        self.partner_reply(RegistryCommand::UpdatePartner(spec)).await
    }

    async fn get_partner(&self, request: Request<pb::GetPartnerRequest>) -> Result<Response<pb::Partner>, Status> {
        require_operator_or_partner(&request, &request.get_ref().partner_id)?;
        let mut check = Check::default();
        let id = parse_partner_id(&mut check, "partner_id", &request.get_ref().partner_id);
        let id = check.finish(|| id)?;
        let record = self
            .platform
            .projections
            .directory
            .partner(&id)
            .ok_or_else(|| Status::not_found(format!("partner {id} not found")))?;
        Ok(Response::new(self.partner_with_metrics(&record).await))
    }

    async fn list_partners(
        &self,
        request: Request<pb::ListPartnersRequest>,
    ) -> Result<Response<pb::ListPartnersResponse>, Status> {
        require_operator(&request)?;
        let r = request.into_inner();
        let mut check = Check::default();
        let hub = check.optional("hub_id", &r.hub_id, HubId::parse);
        let after = check.optional("page_token", &r.page_token, PartnerId::parse);
        let capability = match r.capability {
            0 => None,
            v => {
                let c = capability_from(v);
                if c.is_none() {
                    check.fail("capability", "unknown capability");
                }
                c
            }
        };
        let status = match r.status {
            0 => None,
            v => {
                let s = status_from(v);
                if s.is_none() {
                    check.fail("status", "unknown status");
                }
                s
            }
        };
        check.finish(|| Some(()))?;
        let limit = page_size(r.page_size);
        let partners = self
            .platform
            .projections
            .directory
            .partners(after.as_ref(), limit + 1, |p| {
                hub.as_ref().is_none_or(|h| p.hubs.contains_key(h))
                    && capability.is_none_or(|c| p.spec.capabilities.contains(&c))
                    && status.is_none_or(|s| p.status == s)
            });
        let next_page_token = if partners.len() > limit {
            partners[limit - 1].spec.partner_id.to_string()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListPartnersResponse {
            partners: partners.iter().take(limit).map(|p| partner(p)).collect(),
            next_page_token,
        }))
    }

    async fn set_partner_status(
        &self,
        request: Request<pb::SetPartnerStatusRequest>,
    ) -> Result<Response<pb::Partner>, Status> {
        require_operator(&request)?;
        let r = request.into_inner();
        let mut check = Check::default();
        let partner_id = parse_partner_id(&mut check, "partner_id", &r.partner_id);
        let status = status_from(r.status);
        if status.is_none() {
            check.fail("status", "must be PROBATION, ACTIVE or SUSPENDED");
        }
        check.text("reason", &r.reason, false);
        let (partner_id, status) = check.finish(|| Some((partner_id?, status?)))?;
        self.partner_reply(RegistryCommand::SetStatus {
            partner_id,
            status,
            reason: if r.reason.is_empty() {
                "set by the operator".into()
            } else {
                r.reason
            },
            source: StatusSource::Operator,
        })
        .await
    }

    async fn assign_partner(
        &self,
        request: Request<pb::AssignPartnerRequest>,
    ) -> Result<Response<pb::Partner>, Status> {
        require_operator(&request)?;
        let r = request.into_inner();
        let mut check = Check::default();
        let partner_id = parse_partner_id(&mut check, "partner_id", &r.partner_id);
        let hub_id = check.parse("hub_id", &r.hub_id, HubId::parse);
        let (partner_id, hub_id) = check.finish(|| Some((partner_id?, hub_id?)))?;
        self.partner_reply(RegistryCommand::Assign {
            partner_id,
            hub_id,
            rank: (r.rank > 0).then_some(r.rank),
        })
        .await
    }

    async fn create_hub(&self, request: Request<pb::CreateHubRequest>) -> Result<Response<pb::Hub>, Status> {
        require_operator(&request)?;
        let spec = hub_spec(request.get_ref().hub.as_ref())?;
        let record = self.hub_command(RegistryCommand::CreateHub(spec)).await?;
        info!(hub_id = %record.spec.hub_id, city = %record.spec.city, "hub created");
        Ok(Response::new(hub_record(&record)))
    }

    async fn update_hub(&self, request: Request<pb::UpdateHubRequest>) -> Result<Response<pb::Hub>, Status> {
        require_operator(&request)?;
        let spec = hub_spec(request.get_ref().hub.as_ref())?;
        let record = self.hub_command(RegistryCommand::UpdateHub(spec)).await?;
        Ok(Response::new(hub_record(&record)))
    }

    async fn get_hub(&self, request: Request<pb::GetHubRequest>) -> Result<Response<pb::Hub>, Status> {
        require_operator(&request)?;
        let mut check = Check::default();
        let hub_id = check.parse("hub_id", &request.get_ref().hub_id, HubId::parse);
        let hub_id = check.finish(|| hub_id)?;
        let record = self
            .platform
            .projections
            .directory
            .hub(&hub_id)
            .ok_or_else(|| Status::not_found(format!("hub {hub_id} not found")))?;
        let view = self.hub_view(&hub_id).await?;
        Ok(Response::new(hub_with_view(&record, &view)))
    }

    async fn list_hubs(&self, request: Request<pb::ListHubsRequest>) -> Result<Response<pb::ListHubsResponse>, Status> {
        require_operator(&request)?;
        let mut check = Check::default();
        let city = check.optional("city", &request.get_ref().city, CityName::parse);
        check.finish(|| Some(()))?;
        let hubs = self
            .platform
            .projections
            .directory
            .hubs()
            .iter()
            .filter(|h| city.as_ref().is_none_or(|c| &h.spec.city == c))
            .map(|h| hub_record(h))
            .collect();
        Ok(Response::new(pb::ListHubsResponse { hubs }))
    }

    async fn list_audit_entries(
        &self,
        request: Request<pb::ListAuditEntriesRequest>,
    ) -> Result<Response<pb::ListAuditEntriesResponse>, Status> {
        require_operator(&request)?;
        let r = request.into_inner();
        let mut check = Check::default();
        let subject = match &r.subject {
            Some(pb::list_audit_entries_request::Subject::OrderId(id)) => check
                .parse("order_id", id, domain::OrderId::parse)
                .map(|id| AuditSubject::Order(id.to_string())),
            Some(pb::list_audit_entries_request::Subject::PartnerId(id)) => {
                parse_partner_id(&mut check, "partner_id", id).map(|id| AuditSubject::Partner(id.to_string()))
            }
            None => {
                check.fail("subject", "give an order_id or a partner_id");
                None
            }
        };
        let before = if r.page_token.is_empty() {
            None
        } else {
            let parsed = r.page_token.parse::<u64>().ok();
            if parsed.is_none() {
                check.fail("page_token", "is not a token from an earlier page");
            }
            parsed
        };
        let subject = check.finish(|| subject)?;
        let page = self
            .platform
            .audit
            .list(&subject, before, page_size(r.page_size))
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::ListAuditEntriesResponse {
            entries: page.entries.iter().map(audit_entry).collect(),
            next_page_token: page.next.map(|n| n.to_string()).unwrap_or_default(),
        }))
    }
}
