//! The hub's invariants, checked against its whole state (tests, audits, debug builds).

use super::*;

impl HubState {
    /// Checks the invariants listed in the module documentation.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut held: BTreeMap<&PartnerId, u32> = BTreeMap::new();
        let (mut open, mut waiting) = (0u32, 0u32);
        for d in self.dispatches.values() {
            if let Some(p) = d.stage.holder() {
                *held.entry(p).or_default() += 1;
            }
            if !d.stage.is_finished() {
                open += 1;
            }
            if d.is_waiting() {
                waiting += 1;
            }
            if let Stage::Failed { .. } = d.stage {
                if d.remedies.iter().all(|r| r.kind != RemedyKind::NotDelivered) {
                    return Err(format!("{} failed without a remedy", d.order.order_id));
                }
            }
            let credited: i64 = d.remedies.iter().map(|r| r.amount.minor_units).sum();
            if credited > d.order.amount.minor_units || d.remedies.iter().any(|r| r.amount.minor_units < 0) {
                return Err(format!("{} remedies exceed the order amount", d.order.order_id));
            }
        }
        for (p, stats) in &self.core.stats {
            let h = held.get(p).copied().unwrap_or(0);
            if stats.open != h {
                return Err(format!("{p} has load {} but holds {h} dispatches", stats.open));
            }
        }
        if open != self.core.open {
            return Err(format!("open count {} but {open} open dispatches", self.core.open));
        }
        if waiting != self.core.waiting || self.queue.len() as u32 != waiting {
            return Err(format!(
                "waiting count {} / queue {} but {waiting} waiting dispatches",
                self.core.waiting,
                self.queue.len()
            ));
        }
        Ok(())
    }
}
