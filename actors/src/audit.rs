//! An independent check of a drop against its journals: every SKU is rebuilt from its full
//! event stream (ignoring snapshots and live actors) and its invariants are checked. This is
//! what "oversell 0" in reports is measured against.

use crate::hosted::Hosted;
use crate::journal::Journal;
use domain::drop::{DropEvent, DropState};
use domain::sku::{SkuEvent, SkuState};
use domain::{Aggregate, DropId, SkuId};

#[derive(Debug, Clone)]
pub struct SkuAudit {
    pub sku_id: SkuId,
    pub allocated: u64,
    pub available: u64,
    pub held: u64,
    pub sold: u64,
    pub events: usize,
    /// Units sold or held beyond the allocation (0 unless something is badly wrong).
    pub oversold: u64,
    pub invariants: Result<(), String>,
}

pub async fn audit_drop(journal: &dyn Journal, drop_id: &DropId) -> Result<Vec<SkuAudit>, String> {
    let mut drop = DropState::default();
    for (_, bytes) in journal
        .load_all(&DropState::stream(drop_id))
        .await
        .map_err(|e| e.to_string())?
    {
        let event: DropEvent = crate::codec::decode(&bytes)?;
        drop.apply(&event);
    }
    let spec = drop.spec.ok_or_else(|| format!("drop {drop_id} has no journal"))?;
    let mut audits = Vec::with_capacity(spec.skus.len());
    for sku in &spec.skus {
        let mut state = SkuState::new(&spec, sku);
        let events = journal
            .load_all(&SkuState::stream(&(drop_id.clone(), sku.sku_id.clone())))
            .await
            .map_err(|e| e.to_string())?;
        for (_, bytes) in &events {
            let event: SkuEvent = crate::codec::decode(bytes)?;
            state.apply(&event);
        }
        let sum = |f: fn(&domain::sku::Pool) -> u32| state.pools.iter().map(|p| u64::from(f(p))).sum::<u64>();
        let (allocated, available, held, sold) = (
            sum(|p| p.allocated),
            sum(|p| p.available),
            sum(|p| p.held),
            sum(|p| p.sold),
        );
        let oversold = state
            .pools
            .iter()
            .map(|p| (u64::from(p.sold) + u64::from(p.held)).saturating_sub(u64::from(p.allocated)))
            .sum();
        audits.push(SkuAudit {
            sku_id: sku.sku_id.clone(),
            allocated,
            available,
            held,
            sold,
            events: events.len(),
            oversold,
            invariants: state.check_invariants(),
        });
    }
    Ok(audits)
}
