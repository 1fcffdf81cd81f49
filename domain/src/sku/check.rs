//! The SKU's invariants, checked against its whole state (tests, audits, debug builds).

use super::decide::{pools_of, serving};
use super::*;

impl SkuState {
    /// Checks every invariant against the whole state; O(orders). For tests and audits.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut held = vec![0u32; self.pools.len()];
        let mut sold = vec![0u32; self.pools.len()];
        let mut active: HashMap<&BuyerRef, u32> = HashMap::new();
        for order in self.orders.values() {
            match order.status {
                OrderStatus::Held => held[order.pool.ok_or("held order without a pool")?] += order.quantity,
                OrderStatus::Confirmed => sold[order.pool.ok_or("confirmed order without a pool")?] += order.quantity,
                _ => {}
            }
            let counted = match order.status {
                OrderStatus::Waitlisted => order.requested,
                OrderStatus::Held | OrderStatus::Confirmed => order.quantity,
                OrderStatus::Expired | OrderStatus::Cancelled => 0,
            };
            if counted > 0 {
                *active.entry(&order.buyer).or_default() += counted;
            }
        }
        self.check_leases()?;
        for (i, pool) in self.pools.iter().enumerate() {
            let leased = self.leased(i);
            if u64::from(pool.available) + u64::from(pool.held) + u64::from(pool.sold) + u64::from(leased)
                != u64::from(pool.allocated)
            {
                return Err(format!(
                    "pool {}: available {} + held {} + sold {} + leased {leased} != allocated {}",
                    pool.hub_id, pool.available, pool.held, pool.sold, pool.allocated
                ));
            }
            if pool.held != held[i] || pool.sold != sold[i] {
                return Err(format!(
                    "pool {}: counters (held {}, sold {}) disagree with orders ({}, {})",
                    pool.hub_id, pool.held, pool.sold, held[i], sold[i]
                ));
            }
        }
        if active.len() != self.buyer_active.len() || active.iter().any(|(b, n)| self.buyer_active.get(*b) != Some(n)) {
            return Err("per-buyer totals disagree with orders".into());
        }
        for (city, queue) in &self.waitlists {
            for id in queue {
                let order = self.orders.get(id).ok_or("waitlist names an unknown order")?;
                if order.status != OrderStatus::Waitlisted || &order.city != city {
                    return Err(format!("waitlist of {city} holds {id} in status {:?}", order.status));
                }
                if order
                    .pool
                    .is_some_and(|i| self.pools.get(i).is_none_or(|p| &p.city != city))
                {
                    return Err(format!("{id} waits in {city} pinned to a hub of another city"));
                }
            }
        }
        let expiring = self.orders.values().filter(|o| o.status == OrderStatus::Held).count();
        if expiring != self.expiries.len() {
            return Err(format!(
                "{} held orders but {} expiry timers",
                expiring,
                self.expiries.len()
            ));
        }
        let revenue: i64 = self
            .orders
            .values()
            .filter(|&o| o.status == OrderStatus::Confirmed)
            .map(|o| o.confirmation.as_ref().map_or(0, |c| c.amount.minor_units))
            .sum();
        if revenue != self.revenue_minor_units {
            return Err(format!(
                "revenue {} != sum of confirmed orders {}",
                self.revenue_minor_units, revenue
            ));
        }
        Ok(())
    }

    /// Checks the waitlist rule at `now`: while the sale is open, no waitlisted request can be
    /// served from the stock that is free, so the waitlist never strands stock and a newcomer
    /// served from free stock passes nobody who could have had it. Apart from
    /// `check_invariants` because it needs the time (once the sale has closed, returned stock
    /// is no longer promoted) and because journals written before the rule may break it.
    /// O(waitlisted × pools). For tests.
    pub fn check_waitlist(&self, now: UnixMillis) -> Result<(), String> {
        if self.effective_sale(now) != SaleStatus::Open {
            return Ok(());
        }
        let available = self.available_now();
        for (city, queue) in &self.waitlists {
            let city_pools = self.city_pools(city);
            for id in queue {
                let order = self.orders.get(id).ok_or("waitlist names an unknown order")?;
                let free = pools_of(order, &city_pools).map(|i| (i, available[i]));
                if let Some((pool, quantity)) = serving(order.requested, order.allow_partial, free) {
                    return Err(format!(
                        "{id} waits in {city} for {} units while hub {} has {quantity} of them free",
                        order.requested, self.pools[pool].hub_id
                    ));
                }
            }
        }
        Ok(())
    }
}
