//! Valid encodings to mutate: every hosted aggregate driven through a short life (commands
//! decided and applied as its actor would), with its state encoded as a snapshot along the
//! way, its events as the journal writes them, and its commands and replies as they travel
//! between nodes.

use actors::audit_log::AuditEntry;
use actors::bus::wire_encode;
use actors::codec;
use domain::drop::{DropCommand, DropSpec, DropState, PoolSpec, SaleStatus, SettlementTerms, SkuSpec};
use domain::hub::{CourierAction, DispatchOrder, Fault, HubCommand, HubState, Remedy, RemedyKind};
use domain::ledger::{
    FulfilmentFacts, LedgerCommand, LedgerInput, LedgerState, RefundReason, SaleFacts, StatementQuery,
};
use domain::registry::{
    Capability, HubSetup, HubSpec, PartnerKind, PartnerSpec, PartnerStatus, RegistryCommand, RegistryState,
    RosterEntry, SlaTargets, StatusSource,
};
use domain::sku::{
    ConfirmCommand, EdgeSale, Fulfilment, LeaseCommand, ReserveCommand, ReserveParams, RestockCommand, SkuCommand,
    SkuState,
};
use domain::*;
use serde::Serialize;

/// The encodings of one aggregate's life.
#[derive(Default)]
pub struct Seeds {
    /// `codec::encode` of the state at several points (snapshots).
    pub snapshots: Vec<Vec<u8>>,
    /// `codec::encode` of every event (journal entries).
    pub events: Vec<Vec<u8>>,
    /// `wire_encode` of every command and of every reply (between nodes).
    pub commands: Vec<Vec<u8>>,
    pub replies: Vec<Vec<u8>>,
}

const T0: UnixMillis = UnixMillis(1_800_000_000_000);

fn at(ms: i64) -> UnixMillis {
    UnixMillis(T0.0 + ms)
}

/// Decides and applies `commands` in order from `state` (a rejected one changes nothing,
/// as in the actor), snapshotting before, halfway and after.
fn drive<H>(mut state: H, commands: Vec<(H::Command, UnixMillis)>) -> Seeds
where
    H: Aggregate + Serialize,
    H::Command: Serialize + Clone,
    H::Event: Serialize,
    H::Reply: Serialize,
{
    let mut seeds = Seeds::default();
    let half = commands.len() / 2;
    seeds.snapshots.push(codec::encode(&state));
    for (i, (command, now)) in commands.into_iter().enumerate() {
        seeds.commands.push(wire_encode(&command).expect("a command encodes"));
        if let Ok((events, reply)) = state.decide(command, now) {
            for event in &events {
                state.apply(event);
                seeds.events.push(codec::encode(event));
            }
            seeds.replies.push(wire_encode(&reply).expect("a reply encodes"));
        }
        if i == half {
            seeds.snapshots.push(codec::encode(&state));
        }
    }
    seeds.snapshots.push(codec::encode(&state));
    seeds
}

fn eur(minor_units: i64) -> Money {
    Money::new(minor_units, Currency::parse("EUR").unwrap())
}

fn drop_id() -> DropId {
    DropId::parse("d1").unwrap()
}

fn sku_id() -> SkuId {
    SkuId::parse("s1").unwrap()
}

fn hub_id() -> HubId {
    HubId::parse("hub-a").unwrap()
}

fn partner(i: u8) -> PartnerId {
    PartnerId::parse(&format!("p{i}")).unwrap()
}

fn creator() -> CreatorId {
    CreatorId::parse("c1").unwrap()
}

fn order(n: u64) -> OrderId {
    OrderId::new(&drop_id(), &sku_id(), n)
}

fn terms() -> SettlementTerms {
    SettlementTerms {
        platform_fee_bps: 1_000,
        delivery_fee_minor_units: 300,
        return_window_ms: 60_000,
    }
}

pub fn drop_spec() -> DropSpec {
    DropSpec {
        drop_id: drop_id(),
        creator_id: creator(),
        title: "winter drop".into(),
        opens_at: at(0),
        closes_at: at(3_600_000),
        hold_ttl_ms: 60_000,
        terms: terms(),
        skus: vec![SkuSpec {
            sku_id: sku_id(),
            name: "hoodie".into(),
            price: eur(2_500),
            per_buyer_limit: 2,
            pools: vec![
                PoolSpec {
                    hub_id: hub_id(),
                    city: CityName::parse("Lisbon").unwrap(),
                    allocated: 3,
                },
                PoolSpec {
                    hub_id: HubId::parse("hub-b").unwrap(),
                    city: CityName::parse("Porto").unwrap(),
                    allocated: 1,
                },
            ],
        }],
    }
}

pub fn drop() -> Seeds {
    drive(
        DropState::default(),
        vec![
            (DropCommand::Get, at(0)),
            (DropCommand::Create(drop_spec()), at(0)),
            (DropCommand::Open, at(1)),
            (DropCommand::Get, at(2)),
            (DropCommand::Close, at(3)),
        ],
    )
}

fn reserve(n: u64, buyer: &str, city: &str, quantity: u32, key: Option<&str>) -> SkuCommand {
    SkuCommand::Reserve(ReserveCommand {
        order_id: order(n),
        params: ReserveParams {
            storefront: StorefrontId::parse("web").unwrap(),
            buyer: BuyerRef::from_hash_hex(format!("{buyer:0>32}")),
            city: CityName::parse(city).unwrap(),
            hub_id: None,
            quantity,
            allow_partial: true,
            join_waitlist: true,
        },
        idempotency_key: key.map(|k| IdempotencyKey::parse(k).unwrap()),
    })
}

fn confirm(n: u64, amount: i64, fulfilment: Fulfilment, discreet: bool) -> SkuCommand {
    SkuCommand::Confirm(ConfirmCommand {
        order_id: order(n),
        storefront: Some(StorefrontId::parse("web").unwrap()),
        address_digest: (fulfilment == Fulfilment::Delivery).then(|| "0123456789abcdef0123456789abcdef".into()),
        payment_reference: format!("pay-{n}"),
        amount: eur(amount),
        fulfilment,
        discreet,
        pickup_code: format!("{n:06}"),
        receipt_token: format!("receipt-{n}"),
    })
}

pub fn sku() -> Seeds {
    let spec = drop_spec();
    let state = SkuState::new(&spec, &spec.skus[0]);
    drive(
        state,
        vec![
            (SkuCommand::SetSaleStatus(SaleStatus::Open), at(1)),
            (reserve(1, "a1", "Lisbon", 1, Some("key-1")), at(10)),
            (reserve(1, "a1", "Lisbon", 1, Some("key-1")), at(11)),
            (reserve(2, "b2", "Lisbon", 2, None), at(20)),
            (reserve(3, "c3", "Lisbon", 1, None), at(30)),
            (reserve(4, "d4", "Porto", 1, None), at(40)),
            (confirm(1, 2_500, Fulfilment::Delivery, true), at(50)),
            (confirm(4, 2_500, Fulfilment::Pickup, false), at(55)),
            (
                SkuCommand::Cancel {
                    order_id: order(2),
                    storefront: Some(StorefrontId::parse("web").unwrap()),
                    withdrawn: true,
                },
                at(60),
            ),
            (SkuCommand::GetOrder { order_id: order(3) }, at(70)),
            (SkuCommand::GetFigures, at(80)),
            (
                SkuCommand::Restock(RestockCommand {
                    hub_id: hub_id(),
                    city: None,
                    quantity: 2,
                    idempotency_key: Some(IdempotencyKey::parse("restock-1").unwrap()),
                }),
                at(90),
            ),
            (SkuCommand::ExpireDue, at(120_000)),
            (
                SkuCommand::HandedOver {
                    orders: vec![(order(1), false), (order(4), false)],
                },
                at(120_001),
            ),
            (
                SkuCommand::LedgerSynced {
                    orders: vec![(order(1), false)],
                },
                at(120_002),
            ),
            (
                SkuCommand::Lease(LeaseCommand {
                    edge: edge(),
                    hub_id: hub_id(),
                    quantity: 2,
                    granted_max: 3,
                    key_id: "k1".into(),
                    expires_at: at(600_000),
                    reconcile_window_ms: 3_600_000,
                }),
                at(120_003),
            ),
            (
                SkuCommand::TopUpLease {
                    edge: edge(),
                    granted_total: 3,
                    by_edge: true,
                },
                at(120_004),
            ),
            (
                SkuCommand::BookEdgeSales {
                    edge: edge(),
                    sales: vec![edge_sale(10, 2_500), edge_sale(11, 9)],
                },
                at(120_005),
            ),
            (SkuCommand::GetLeases, at(120_006)),
            (
                SkuCommand::ReturnLease {
                    edge: edge(),
                    returned_total: None,
                },
                at(120_007),
            ),
        ],
    )
}

fn edge() -> StorefrontId {
    StorefrontId::parse("porto-popup").unwrap()
}

fn edge_sale(n: u64, amount: i64) -> EdgeSale {
    EdgeSale {
        order_id: order(n),
        quantity: 1,
        amount: eur(amount),
        fulfilment: Fulfilment::Pickup,
        payment_reference: format!("card-{n}"),
        pickup_code: "654321".into(),
        receipt_mac: "00ff".into(),
        key_id: "k1".into(),
        sold_at: at(120_004),
    }
}

fn hub_spec() -> HubSpec {
    HubSpec {
        hub_id: hub_id(),
        name: "Lisbon North".into(),
        city: CityName::parse("Lisbon").unwrap(),
        latitude_e6: 38_736_946,
        longitude_e6: -9_142_685,
        slot_ms: 60_000,
        slot_capacity: 2,
        sla: SlaTargets {
            accept_ms: 5_000,
            pickup_ms: 10_000,
            deliver_ms: 20_000,
        },
        probation_share_percent: 50,
        probation_exit_deliveries: 3,
        late_credit_percent: 10,
        give_up_after_ms: 3_600_000,
    }
}

fn capabilities(all: &[Capability]) -> std::collections::BTreeSet<Capability> {
    all.iter().copied().collect()
}

fn dispatch_order(n: u64, fulfilment: Fulfilment, discreet: bool) -> DispatchOrder {
    DispatchOrder {
        order_id: order(n),
        creator_id: creator(),
        item: "hoodie".into(),
        quantity: 1,
        amount: eur(2_500),
        fulfilment,
        discreet,
        pickup_code: format!("{n:06}"),
        confirmed_at: at(0),
    }
}

pub fn hub() -> Seeds {
    let roster = vec![
        RosterEntry {
            partner_id: partner(1),
            rank: 1,
            status: PartnerStatus::Active,
            capabilities: capabilities(&[Capability::Delivery, Capability::PickupPoint]),
            max_open_dispatches: 4,
        },
        RosterEntry {
            partner_id: partner(2),
            rank: 2,
            status: PartnerStatus::Probation,
            capabilities: capabilities(&[Capability::Delivery, Capability::Discreet]),
            max_open_dispatches: 4,
        },
    ];
    let courier = |n: u64, p: u8, action: CourierAction| HubCommand::Courier {
        partner: partner(p),
        order_id: order(n),
        action,
    };
    drive(
        HubState::new(hub_id()),
        vec![
            (HubCommand::Get, at(0)),
            (
                HubCommand::Setup(HubSetup {
                    version: 1,
                    spec: hub_spec(),
                    roster,
                }),
                at(0),
            ),
            (
                HubCommand::Dispatch(dispatch_order(1, Fulfilment::Delivery, false)),
                at(10),
            ),
            (
                HubCommand::Dispatch(dispatch_order(2, Fulfilment::Delivery, true)),
                at(20),
            ),
            (
                HubCommand::Dispatch(dispatch_order(3, Fulfilment::Pickup, false)),
                at(30),
            ),
            (courier(1, 1, CourierAction::Accept), at(40)),
            (
                courier(
                    1,
                    1,
                    CourierAction::PickedUp {
                        pickup_code: "000001".into(),
                    },
                ),
                at(50),
            ),
            (
                courier(
                    2,
                    2,
                    CourierAction::Decline {
                        reason: "too far".into(),
                    },
                ),
                at(60),
            ),
            (
                courier(
                    3,
                    1,
                    CourierAction::PickedUp {
                        pickup_code: "999999".into(),
                    },
                ),
                at(70),
            ),
            (
                courier(1, 1, CourierAction::Delivered { proof: "signed".into() }),
                at(80),
            ),
            (HubCommand::PendingOffers(partner(2)), at(90)),
            (HubCommand::GetDispatch(order(1)), at(100)),
            (
                HubCommand::ReissuePickupCode {
                    order_id: order(3),
                    pickup_code: "123456".into(),
                },
                at(110),
            ),
            (
                HubCommand::Cancel {
                    order: dispatch_order(3, Fulfilment::Pickup, false),
                    handed_over: true,
                },
                at(120),
            ),
            (HubCommand::ExpireDue, at(10_000_000)),
            (HubCommand::LedgerSynced(vec![(order(1), 1)]), at(10_000_001)),
        ],
    )
}

pub fn ledger() -> Seeds {
    let sale = |n: u64, cancelled: bool| {
        LedgerInput::Sale(SaleFacts {
            order_id: order(n),
            drop_id: drop_id(),
            gross: eur(2_500),
            terms: terms(),
            confirmed_at: at(0),
            cancelled_at: cancelled.then(|| at(5)),
            handed_over_at: None,
        })
    };
    let fulfilment = |n: u64, delivered: bool| {
        LedgerInput::Fulfilment(FulfilmentFacts {
            order_id: order(n),
            delivered_at: delivered.then(|| at(100)),
            failed_at: (!delivered).then(|| at(100)),
            remedies: vec![Remedy {
                kind: if delivered {
                    RemedyKind::LateDelivery
                } else {
                    RemedyKind::NotDelivered
                },
                amount: eur(250),
                at_fault: Fault::Partner(partner(1)),
                at: at(90),
            }],
        })
    };
    drive(
        LedgerState::new(creator()),
        vec![
            (LedgerCommand::GetBalance, at(0)),
            (
                LedgerCommand::Sync(vec![sale(1, false), sale(2, false), sale(3, true), sale(4, false)]),
                at(10),
            ),
            (
                LedgerCommand::Sync(vec![fulfilment(1, true), fulfilment(2, false)]),
                at(200),
            ),
            (
                LedgerCommand::Return {
                    order_id: order(4),
                    reason: "wrong size".into(),
                },
                at(300),
            ),
            (
                LedgerCommand::Refund {
                    order_id: order(4),
                    reason: RefundReason::Cancelled,
                },
                at(310),
            ),
            (LedgerCommand::ReleaseDue, at(1_000_000)),
            (
                LedgerCommand::Payout {
                    key: IdempotencyKey::parse("payout-1").unwrap(),
                    amount: eur(100),
                },
                at(1_000_001),
            ),
            (LedgerCommand::GetOrder(order(1)), at(1_000_002)),
            (
                LedgerCommand::Statement(StatementQuery {
                    from: at(0),
                    to: at(2_000_000),
                    after_seq: 0,
                    limit: 50,
                }),
                at(1_000_003),
            ),
            (
                LedgerCommand::Payouts {
                    before: None,
                    limit: 10,
                },
                at(1_000_004),
            ),
            (
                LedgerCommand::Orders {
                    after: Some(order(1)),
                    limit: 10,
                },
                at(1_000_005),
            ),
            (LedgerCommand::Check, at(1_000_006)),
        ],
    )
}

pub fn registry() -> Seeds {
    let partner_spec = |i: u8, kind: PartnerKind| PartnerSpec {
        partner_id: partner(i),
        name: format!("partner {i}"),
        kind,
        capabilities: capabilities(&[Capability::Delivery, Capability::Discreet]),
        max_open_dispatches: 3,
    };
    let hash = "ab".repeat(32);
    drive(
        RegistryState::default(),
        vec![
            (RegistryCommand::Load, at(0)),
            (RegistryCommand::CreateHub(hub_spec()), at(1)),
            (
                RegistryCommand::RegisterPartner {
                    spec: partner_spec(1, PartnerKind::Courier),
                    credential_hash: hash.clone(),
                },
                at(2),
            ),
            (
                RegistryCommand::RegisterPartner {
                    spec: partner_spec(2, PartnerKind::Locker),
                    credential_hash: hash.clone(),
                },
                at(3),
            ),
            (
                RegistryCommand::UpdatePartner(partner_spec(2, PartnerKind::Shop)),
                at(4),
            ),
            (
                RegistryCommand::Assign {
                    partner_id: partner(1),
                    hub_id: hub_id(),
                    rank: Some(1),
                },
                at(5),
            ),
            (
                RegistryCommand::SetStatus {
                    partner_id: partner(1),
                    status: PartnerStatus::Active,
                    reason: "vetted".into(),
                    source: StatusSource::Operator,
                },
                at(6),
            ),
            (
                RegistryCommand::RegisterCreator {
                    creator_id: creator(),
                    display_name: "Ana".into(),
                    credential_hash: hash.clone(),
                },
                at(7),
            ),
            (
                RegistryCommand::RegisterStorefront {
                    storefront_id: StorefrontId::parse("web").unwrap(),
                    display_name: "Web shop".into(),
                    credential_hash: hash.clone(),
                },
                at(8),
            ),
            (
                RegistryCommand::ResetCreatorCredential {
                    creator_id: creator(),
                    credential_hash: "cd".repeat(32),
                },
                at(9),
            ),
            (RegistryCommand::UpdateHub(hub_spec()), at(10)),
            (RegistryCommand::GetHubSetup(hub_id()), at(11)),
            (RegistryCommand::Directory, at(12)),
        ],
    )
}

pub fn audit_entries() -> Vec<Vec<u8>> {
    [
        AuditEntry {
            at: at(1),
            action: "offered".into(),
            order_id: Some(order(1).to_string()),
            partner_id: Some("p1".into()),
            hub_id: Some("hub-a".into()),
            detail: "rank 1".into(),
        },
        AuditEntry {
            at: at(2),
            action: "credential_used".into(),
            order_id: None,
            partner_id: None,
            hub_id: None,
            detail: String::new(),
        },
    ]
    .iter()
    .map(codec::encode)
    .collect()
}
