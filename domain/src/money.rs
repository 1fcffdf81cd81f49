//! Money as integer minor units of one ISO 4217 currency; never floats. A currency is an
//! ISO 4217 code in circulation (the table and its minor-unit exponents come from the
//! `iso_currency` crate), so `ZZZ` is refused and ¥1,000 is `1000 JPY`, never `10.00`.

use serde::{Deserialize, Serialize};
use std::fmt;

/// An ISO 4217 alphabetic currency code in circulation, three upper-case ASCII letters.
/// Stored as its code (journals and snapshots keep the three letters), so adding or
/// withdrawing a code in the table never makes a journal unreadable.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Currency([u8; 3]);

/// Minor-unit exponent assumed for a code the table does not know. Only a journal written
/// before codes were checked can hold one (`parse` refuses them); two decimals is what
/// amounts were printed with then.
const EXPONENT_UNKNOWN_CODE: u32 = 2;

impl Currency {
    /// A code of the ISO 4217 table that money can be in: not a fund or special code (gold,
    /// SDR, `XXX`, `XTS`), nor one replaced by another (`HRK` by `EUR`).
    pub fn parse(code: &str) -> Result<Currency, String> {
        let bytes = code.as_bytes();
        if bytes.len() != 3 || !bytes.iter().all(|b| b.is_ascii_uppercase()) {
            return Err(format!(
                "currency must be a 3-letter upper-case ISO 4217 code, got {code:?}"
            ));
        }
        let Some(iso) = iso_currency::Currency::from_code(code) else {
            return Err(format!("{code} is not an ISO 4217 currency"));
        };
        if let Some(successor) = iso.is_superseded() {
            return Err(format!("{code} was replaced by {}", successor.code()));
        }
        if iso.is_fund() || iso.is_special() || iso.exponent().is_none() {
            return Err(format!("{code} ({}) is not a currency a price can be in", iso.name()));
        }
        Ok(Currency([bytes[0], bytes[1], bytes[2]]))
    }

    pub fn as_str(&self) -> &str {
        // Constructed only from ASCII upper-case letters.
        std::str::from_utf8(&self.0).unwrap_or("???")
    }

    /// Digits after the decimal point (the ISO 4217 minor unit): 2 for EUR, 0 for JPY, 3 for
    /// BHD; one major unit is `10^exponent` minor units.
    pub fn exponent(&self) -> u32 {
        exponent_of(self.as_str())
    }

    /// `minor_units` written in major units with exactly [`Currency::exponent`] decimals
    /// and no symbol: `12.50` (EUR), `1000` (JPY), `1.250` (BHD).
    pub fn format_amount(&self, minor_units: i64) -> String {
        format_minor_units(minor_units, self.exponent())
    }
}

/// The minor-unit exponent of the currency `code`, however it was stored or sent: a code
/// the table does not know (only old journals and their readers see one) gets two.
pub fn exponent_of(code: &str) -> u32 {
    iso_currency::Currency::from_code(code)
        .and_then(|c| c.exponent())
        .map_or(EXPONENT_UNKNOWN_CODE, u32::from)
}

/// `minor_units` as major units with `exponent` decimals: (`1250`, 2) → `12.50`, (`-5`, 3)
/// → `-0.005`, (`1000`, 0) → `1000`.
pub fn format_minor_units(minor_units: i64, exponent: u32) -> String {
    let sign = if minor_units < 0 { "-" } else { "" };
    let abs = minor_units.unsigned_abs();
    if exponent == 0 {
        return format!("{sign}{abs}");
    }
    let scale = 10u64.pow(exponent);
    let width = exponent as usize;
    format!("{sign}{}.{:0width$}", abs / scale, abs % scale)
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

/// An amount in minor units of a currency (cents of EUR, yen of JPY, fils of BHD).
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
        write!(f, "{} {}", self.currency.format_amount(self.minor_units), self.currency)
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
    // The units left over are fewer than the parts (each floor lost less than one), so all
    // were handed out: the parts add up to the total, as every ledger entry relies on.
    assert_eq!(left, 0, "allocate: {left} of {total} minor units not allocated");
    parts
}

#[cfg(test)]
mod tests {
    use super::{allocate, format_minor_units, Currency, Money};

    fn money(minor_units: i64, code: &str) -> String {
        Money::new(minor_units, Currency::parse(code).unwrap()).to_string()
    }

    #[test]
    fn each_currency_prints_with_its_own_minor_unit() {
        assert_eq!(money(1_000, "JPY"), "1000 JPY");
        assert_eq!(money(1_250, "EUR"), "12.50 EUR");
        assert_eq!(money(1_250, "BHD"), "1.250 BHD");
        assert_eq!(money(-5, "KWD"), "-0.005 KWD");
        assert_eq!(money(7, "USD"), "0.07 USD");
        assert_eq!(money(-1_000, "KRW"), "-1000 KRW");
        assert_eq!(format_minor_units(123_456, 4), "12.3456");
    }

    #[test]
    fn exponents_come_from_the_iso_4217_table() {
        let exponent = |code: &str| Currency::parse(code).unwrap().exponent();
        assert_eq!(exponent("EUR"), 2);
        assert_eq!(exponent("USD"), 2);
        assert_eq!(exponent("JPY"), 0);
        assert_eq!(exponent("KRW"), 0);
        assert_eq!(exponent("BHD"), 3);
        assert_eq!(exponent("KWD"), 3);
        assert_eq!(exponent("TND"), 3);
    }

    #[test]
    fn codes_outside_the_table_or_not_for_prices_are_refused() {
        assert!(Currency::parse("ZZZ").unwrap_err().contains("not an ISO 4217 currency"));
        assert!(Currency::parse("eur").is_err());
        assert!(Currency::parse("EURO").is_err());
        assert!(Currency::parse("XAU").is_err(), "gold is not money a price can be in");
        assert!(Currency::parse("XXX").is_err(), "the no-currency code");
        assert!(Currency::parse("XTS").is_err(), "the testing code");
        assert!(Currency::parse("CLF").is_err(), "a fund code");
        assert_eq!(Currency::parse("HRK").unwrap_err(), "HRK was replaced by EUR");
    }

    #[test]
    fn a_code_stored_before_codes_were_checked_still_reads_with_two_decimals() {
        let stored: Currency = postcard::from_bytes(&postcard::to_allocvec(&[b'Z'; 3]).unwrap()).unwrap();
        assert_eq!(stored.as_str(), "ZZZ");
        assert_eq!(Money::new(1_000, stored).to_string(), "10.00 ZZZ");
    }

    #[test]
    fn parts_add_up_and_the_largest_remainders_get_the_units_left() {
        assert_eq!(allocate(100, &[1, 1, 1]), vec![34, 33, 33]);
        assert_eq!(allocate(10, &[8_500, 1_500]), vec![9, 1]); // 8.5 / 1.5: tie goes to the first
        assert_eq!(allocate(1_999, &[9_000, 1_000]), vec![1_799, 200]); // 1799.1 / 199.9
        assert_eq!(allocate(0, &[3, 7]), vec![0, 0]);
        assert_eq!(allocate(7, &[0, 5]), vec![0, 7]);
    }
}
