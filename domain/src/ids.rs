//! Validated identifiers. A value of one of these types is always well formed, so the rest
//! of the code never re-checks ids. Each is an `Arc<str>`: an id is copied into several
//! indexes of a SKU's state (orders, expiries, waitlists, buyer limits) and into every event,
//! and a clone is a reference count, not an allocation.

use crate::limits::{IDEMPOTENCY_KEY_LEN_MAX, ID_LEN_MAX};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IdError {
    /// The id is missing (an empty string is proto3's unset field).
    #[error("is required")]
    Empty,
    #[error("must be at most {max} characters, got {len}")]
    TooLong { len: usize, max: usize },
    #[error("may contain only ASCII letters, digits, '-' and '_'")]
    BadCharacter,
    #[error("must look like <drop_id>.<sku_id>.<16 hex digits>")]
    BadOrderId,
    #[error("must not contain control characters")]
    ControlCharacter,
}

fn check_slug(s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > ID_LEN_MAX {
        return Err(IdError::TooLong {
            len: s.len(),
            max: ID_LEN_MAX,
        });
    }
    if !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(IdError::BadCharacter);
    }
    Ok(())
}

macro_rules! slug_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Arc<str>);

        impl $name {
            pub fn parse(s: &str) -> Result<$name, IdError> {
                check_slug(s)?;
                Ok($name(Arc::from(s)))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

slug_id!(
    /// A drop: one creator's time-boxed sale.
    DropId
);
slug_id!(
    /// A sellable variant within a drop.
    SkuId
);
slug_id!(
    /// A micro-fulfilment hub.
    HubId
);
slug_id!(
    /// A creator who sells in drops.
    CreatorId
);
slug_id!(
    /// A storefront: the platform's web or app backend, or a pop-up's till, registered by the
    /// operator; the only caller that may reserve for a buyer.
    StorefrontId
);
slug_id!(
    /// A fulfilment partner (courier, locker bank, shop) in the partner registry.
    PartnerId
);

/// A city a hub's pool is ring-fenced to. Free text (cities have spaces and accents), but
/// bounded and free of control characters; compared exactly.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CityName(Arc<str>);

impl CityName {
    pub fn parse(s: &str) -> Result<CityName, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > ID_LEN_MAX {
            return Err(IdError::TooLong {
                len: s.len(),
                max: ID_LEN_MAX,
            });
        }
        if s.chars().any(char::is_control) {
            return Err(IdError::ControlCharacter);
        }
        Ok(CityName(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CityName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A keyed hash of a buyer's id (32 hex digits). The domain never sees the buyer id itself,
/// so no buyer PII reaches events, journals or logs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BuyerRef(Arc<str>);

impl BuyerRef {
    /// Wraps an already-hashed buyer reference.
    pub fn from_hash_hex(hex: String) -> BuyerRef {
        BuyerRef(hex.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A client-chosen idempotency key (printable ASCII, at most 255 characters).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IdempotencyKey(Arc<str>);

impl IdempotencyKey {
    pub fn parse(s: &str) -> Result<IdempotencyKey, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > IDEMPOTENCY_KEY_LEN_MAX {
            return Err(IdError::TooLong {
                len: s.len(),
                max: IDEMPOTENCY_KEY_LEN_MAX,
            });
        }
        if !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(IdError::BadCharacter);
        }
        Ok(IdempotencyKey(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A reservation, which becomes an order on Confirm under the same id:
/// `<drop_id>.<sku_id>.<16 hex digits>`. The id names the SKU that owns it, so any node
/// can route a request for it without a lookup; the random part is not guessable.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrderId(Arc<str>);

impl OrderId {
    pub const TOKEN_HEX_LEN: usize = 16;

    pub fn new(drop_id: &DropId, sku_id: &SkuId, token: u64) -> OrderId {
        OrderId(format!("{drop_id}.{sku_id}.{token:016x}").into())
    }

    pub fn parse(s: &str) -> Result<OrderId, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        let max = 2 * ID_LEN_MAX + 2 + Self::TOKEN_HEX_LEN;
        if s.len() > max {
            return Err(IdError::TooLong { len: s.len(), max });
        }
        let mut parts = s.split('.');
        let (Some(drop), Some(sku), Some(token), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(IdError::BadOrderId);
        };
        check_slug(drop).map_err(|_| IdError::BadOrderId)?;
        check_slug(sku).map_err(|_| IdError::BadOrderId)?;
        if token.len() != Self::TOKEN_HEX_LEN
            || !token.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(IdError::BadOrderId);
        }
        Ok(OrderId(Arc::from(s)))
    }

    /// The drop and SKU whose actor owns this order.
    pub fn owner(&self) -> (DropId, SkuId) {
        let mut parts = self.0.split('.');
        let drop = parts.next().unwrap_or_default();
        let sku = parts.next().unwrap_or_default();
        (DropId(Arc::from(drop)), SkuId(Arc::from(sku)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_validated() {
        assert!(DropId::parse("spring-drop_2026").is_ok());
        assert_eq!(DropId::parse(""), Err(IdError::Empty));
        assert_eq!(DropId::parse("a.b"), Err(IdError::BadCharacter));
        assert!(matches!(DropId::parse(&"x".repeat(65)), Err(IdError::TooLong { .. })));
    }

    #[test]
    fn order_ids_name_their_owner() {
        let drop = DropId::parse("d1").unwrap();
        let sku = SkuId::parse("hoodie-m").unwrap();
        let id = OrderId::new(&drop, &sku, 0xabc);
        assert_eq!(id.as_str(), "d1.hoodie-m.0000000000000abc");
        assert_eq!(OrderId::parse(id.as_str()).unwrap().owner(), (drop, sku));
        assert!(OrderId::parse("d1.hoodie-m.xyz").is_err());
        assert!(OrderId::parse("d1.hoodie-m").is_err());
    }
}
