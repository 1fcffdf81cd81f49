//! Money as integer minor units of one ISO 4217 currency; never floats.

use serde::{Deserialize, Serialize};
use std::fmt;

/// An ISO 4217 alphabetic currency code, three upper-case ASCII letters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Currency([u8; 3]);

impl Currency {
    pub fn parse(code: &str) -> Result<Currency, String> {
        let bytes = code.as_bytes();
        if bytes.len() != 3 || !bytes.iter().all(|b| b.is_ascii_uppercase()) {
            return Err(format!(
                "currency must be a 3-letter upper-case ISO 4217 code, got {code:?}"
            ));
        }
        Ok(Currency([bytes[0], bytes[1], bytes[2]]))
    }

    pub fn as_str(&self) -> &str {
        // Constructed only from ASCII upper-case letters.
        std::str::from_utf8(&self.0).unwrap_or("???")
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An amount in minor units (cents) of a currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Money {
    pub minor_units: i64,
    pub currency: Currency,
}

impl Money {
    pub fn new(minor_units: i64, currency: Currency) -> Money {
        Money { minor_units, currency }
    }

    /// The price of `quantity` units, or None on overflow.
    pub fn times(self, quantity: u32) -> Option<Money> {
        self.minor_units
            .checked_mul(i64::from(quantity))
            .map(|minor_units| Money {
                minor_units,
                currency: self.currency,
            })
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.minor_units < 0 { "-" } else { "" };
        let abs = self.minor_units.unsigned_abs();
        write!(f, "{sign}{}.{:02} {}", abs / 100, abs % 100, self.currency)
    }
}

/// Splits `total` minor units into parts proportional to `weights` by the largest remainder
/// method: every part gets the floor of its exact share, then the units left over go one
/// each to the parts with the largest fractional remainders (ties to the earlier part). The
/// parts always add up to `total` exactly, and each is within one unit of its exact share.
/// `total` must be non-negative and the weights must not all be zero.
pub fn allocate(total: i64, weights: &[u64]) -> Vec<i64> {
    assert!(total >= 0, "allocate: negative total {total}");
    let sum: u128 = weights.iter().map(|w| u128::from(*w)).sum();
    assert!(sum > 0, "allocate: all weights are zero");
    let total_u = total as u128;
    let mut parts: Vec<i64> = Vec::with_capacity(weights.len());
    let mut remainders: Vec<(u128, usize)> = Vec::with_capacity(weights.len());
    for (i, w) in weights.iter().enumerate() {
        let exact = total_u * u128::from(*w);
        parts.push((exact / sum) as i64);
        remainders.push((exact % sum, i));
    }
    let mut left = total - parts.iter().sum::<i64>();
    // Largest remainder first; equal remainders in part order, so the result is deterministic.
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for (_, i) in remainders {
        if left == 0 {
            break;
        }
        parts[i] += 1;
        left -= 1;
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::allocate;

    #[test]
    fn parts_add_up_and_the_largest_remainders_get_the_units_left() {
        assert_eq!(allocate(100, &[1, 1, 1]), vec![34, 33, 33]);
        assert_eq!(allocate(10, &[8_500, 1_500]), vec![9, 1]); // 8.5 / 1.5: tie goes to the first
        assert_eq!(allocate(1_999, &[9_000, 1_000]), vec![1_799, 200]); // 1799.1 / 199.9
        assert_eq!(allocate(0, &[3, 7]), vec![0, 0]);
        assert_eq!(allocate(7, &[0, 5]), vec![0, 7]);
    }
}
