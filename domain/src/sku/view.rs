//! What a SKU shows: an order as its buyer's side sees it, and the SKU's figures.

use super::*;

impl SkuState {
    pub fn order_view(&self, order: &OrderRecord) -> OrderView {
        let waitlist_position = match order.status {
            OrderStatus::Waitlisted => self
                .waitlists
                .get(&order.city)
                .and_then(|q| q.iter().position(|id| id == &order.order_id))
                .map(|i| i as u32 + 1),
            _ => None,
        };
        OrderView {
            order_id: order.order_id.clone(),
            storefront: order.storefront.clone(),
            handed_over: order.confirmation.is_some() && !self.handover.contains(&order.order_id),
            drop_id: self.drop_id.clone(),
            sku_id: self.sku_id.clone(),
            sku_name: self.name.clone(),
            creator_id: self.creator_id.clone(),
            status: order.status,
            // A waitlisted order's pool is only its pin: none of its units are there yet.
            hub_id: order
                .pool
                .filter(|_| order.status != OrderStatus::Waitlisted)
                .map(|i| self.pools[i].hub_id.clone()),
            city: order.city.clone(),
            quantity: order.quantity,
            requested: order.requested,
            amount: self.price.times(order.quantity).unwrap_or(self.price),
            expires_at: order.expires_at,
            waitlist_position,
            confirmation: order.confirmation.clone(),
            updated_at: order.updated_at,
        }
    }

    pub fn figures(&self) -> SkuFigures {
        let mut seen_cities = BTreeSet::new();
        let pools = self
            .pools
            .iter()
            .map(|p| {
                let waitlisted = if seen_cities.insert(&p.city) {
                    self.waitlists.get(&p.city).map_or(0, |q| {
                        q.iter().filter_map(|id| self.orders.get(id)).map(|o| o.requested).sum()
                    })
                } else {
                    0
                };
                PoolFigures {
                    pool: p.clone(),
                    waitlisted,
                }
            })
            .collect();
        SkuFigures {
            drop_id: self.drop_id.clone(),
            sku_id: self.sku_id.clone(),
            name: self.name.clone(),
            price: self.price,
            per_buyer_limit: self.per_buyer_limit,
            sale: self.sale,
            pools,
            revenue: Money::new(self.revenue_minor_units, self.price.currency),
            sold_out_at: self.sold_out_at,
            changed_at: self.changed_at,
            leases: self.lease_figures(),
        }
    }
}
