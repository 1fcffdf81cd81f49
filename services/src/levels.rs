//! Stock levels shown to buyers: coarse on purpose, so bots learn little from polling.

use crate::limits::LOW_STOCK_PERCENT;
use domain::drop::SaleStatus;
use proto::checkout::v1::Level;

pub fn level(sale: SaleStatus, allocated: u64, available: u64, held: u64) -> Level {
    if sale == SaleStatus::Closed || available + held == 0 {
        Level::SoldOut
    } else if available == 0 {
        // Held stock may come back when holds expire: the waitlist is worth joining.
        Level::Waitlist
    } else if available * 100 <= allocated * u64::from(LOW_STOCK_PERCENT) {
        Level::Low
    } else {
        Level::InStock
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_follow_stock() {
        assert_eq!(level(SaleStatus::Open, 100, 50, 0), Level::InStock);
        assert_eq!(level(SaleStatus::Open, 100, 10, 5), Level::Low);
        assert_eq!(level(SaleStatus::Open, 100, 0, 5), Level::Waitlist);
        assert_eq!(level(SaleStatus::Open, 100, 0, 0), Level::SoldOut);
        assert_eq!(level(SaleStatus::Closed, 100, 50, 0), Level::SoldOut);
    }
}
