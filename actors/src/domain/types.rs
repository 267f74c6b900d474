//! Validated newtypes shared by the domain. A constructor is the only way in, so a value of
//! one of these types is valid by construction and the state machines never re-check it.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Milliseconds since the Unix epoch. Commands carry the time so state machines stay pure.
pub type UnixMillis = u64;

/// Why a raw value was refused by a constructor; the message is fit for an API client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidValue {
    pub field: &'static str,
    pub reason: String,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> InvalidValue {
    InvalidValue { field, reason: reason.into() }
}

/// A stock-keeping unit: 1..=64 characters of `[A-Za-z0-9._-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sku(String);

impl Sku {
    pub const MAX_LEN: usize = 64;

    pub fn parse(raw: impl Into<String>) -> Result<Self, InvalidValue> {
        let raw = raw.into();
        if raw.is_empty() {
            return Err(invalid("sku", "must not be empty"));
        }
        if raw.len() > Self::MAX_LEN {
            return Err(invalid("sku", format!("must be at most {} characters", Self::MAX_LEN)));
        }
        if !raw.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
            return Err(invalid("sku", "may contain only letters, digits, '.', '_' and '-'"));
        }
        Ok(Self(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Sku {
    type Error = InvalidValue;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        Self::parse(raw)
    }
}

impl From<Sku> for String {
    fn from(sku: Sku) -> Self {
        sku.0
    }
}

impl fmt::Display for Sku {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Units of one order line: 1..=1000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct Quantity(u32);

impl Quantity {
    pub const MAX: u32 = 1000;

    pub fn new(units: u32) -> Result<Self, InvalidValue> {
        if (1..=Self::MAX).contains(&units) {
            Ok(Self(units))
        } else {
            Err(invalid("quantity", format!("must be between 1 and {}", Self::MAX)))
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<u32> for Quantity {
    type Error = InvalidValue;
    fn try_from(units: u32) -> Result<Self, Self::Error> {
        Self::new(units)
    }
}

impl From<Quantity> for u32 {
    fn from(q: Quantity) -> Self {
        q.0
    }
}

/// An amount of money in cents; never negative by construction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Money(u64);

impl Money {
    pub const ZERO: Money = Money(0);

    pub fn from_cents(cents: u64) -> Self {
        Self(cents)
    }

    /// Refuses negative amounts (a client may send any JSON number).
    pub fn try_from_cents(cents: i64) -> Result<Self, InvalidValue> {
        u64::try_from(cents).map(Self).map_err(|_| invalid("price_cents", "must not be negative"))
    }

    pub fn cents(self) -> u64 {
        self.0
    }

    /// `unit * quantity`, refusing overflow rather than wrapping.
    pub fn times(self, quantity: Quantity) -> Option<Money> {
        self.0.checked_mul(u64::from(quantity.get())).map(Money)
    }

    pub fn checked_add(self, other: Money) -> Option<Money> {
        self.0.checked_add(other.0).map(Money)
    }
}

/// An order's id: a UUIDv7, so ids sort by creation time (cursor pagination relies on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OrderId(uuid::Uuid);

impl OrderId {
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7())
    }

    pub fn parse(raw: &str) -> Result<Self, InvalidValue> {
        uuid::Uuid::try_parse(raw).map(Self).map_err(|_| invalid("order id", "is not a valid id"))
    }

    /// For deterministic tests and simulations.
    pub fn from_u128(v: u128) -> Self {
        Self(uuid::Uuid::from_u128(v))
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// The customer an order belongs to: the JWT subject, 1..=128 printable characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CustomerId(String);

impl CustomerId {
    pub const MAX_LEN: usize = 128;

    pub fn parse(raw: impl Into<String>) -> Result<Self, InvalidValue> {
        let raw = raw.into();
        if raw.is_empty() || raw.len() > Self::MAX_LEN {
            return Err(invalid("customer", format!("must be 1 to {} characters", Self::MAX_LEN)));
        }
        // No control characters and no '/': the id is part of index keys and URLs.
        if raw.chars().any(|c| c.is_control() || c == '/') {
            return Err(invalid("customer", "must not contain control characters or '/'"));
        }
        Ok(Self(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for CustomerId {
    type Error = InvalidValue;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        Self::parse(raw)
    }
}

impl From<CustomerId> for String {
    fn from(c: CustomerId) -> Self {
        c.0
    }
}

impl fmt::Display for CustomerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A payment method token as issued by the provider: `tok_` then 1..=60 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PaymentToken(String);

impl PaymentToken {
    pub fn parse(raw: impl Into<String>) -> Result<Self, InvalidValue> {
        let raw = raw.into();
        let rest = raw.strip_prefix("tok_").ok_or_else(|| invalid("payment_token", "must start with 'tok_'"))?;
        if rest.is_empty() || rest.len() > 60 || !rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(invalid("payment_token", "must be 'tok_' followed by 1 to 60 letters, digits or '_'"));
        }
        Ok(Self(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for PaymentToken {
    type Error = InvalidValue;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        Self::parse(raw)
    }
}

impl From<PaymentToken> for String {
    fn from(t: PaymentToken) -> Self {
        t.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sku_rules() {
        assert!(Sku::parse("widget-1.blue_XL").is_ok());
        assert!(Sku::parse("").is_err());
        assert!(Sku::parse("a".repeat(65)).is_err());
        assert!(Sku::parse("a b").is_err());
        assert!(Sku::parse("a/b").is_err());
    }

    #[test]
    fn quantity_bounds() {
        assert!(Quantity::new(0).is_err());
        assert!(Quantity::new(1).is_ok());
        assert!(Quantity::new(1000).is_ok());
        assert!(Quantity::new(1001).is_err());
    }

    #[test]
    fn money_refuses_negative_and_overflow() {
        assert!(Money::try_from_cents(-1).is_err());
        assert_eq!(Money::try_from_cents(5).map(Money::cents), Ok(5));
        let q = Quantity::new(1000).expect("valid");
        assert_eq!(Money::from_cents(u64::MAX).times(q), None);
    }

    #[test]
    fn payment_token_rules() {
        assert!(PaymentToken::parse("tok_visa").is_ok());
        assert!(PaymentToken::parse("tok_").is_err());
        assert!(PaymentToken::parse("visa").is_err());
        assert!(PaymentToken::parse("tok_a-b").is_err());
    }

    proptest! {
        #[test]
        fn sku_accepts_exactly_the_documented_alphabet(raw in "\\PC{0,80}") {
            let ok = !raw.is_empty() && raw.len() <= 64
                && raw.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            prop_assert_eq!(Sku::parse(raw.clone()).is_ok(), ok);
        }

        #[test]
        fn quantity_accepts_exactly_1_to_1000(units in any::<u32>()) {
            prop_assert_eq!(Quantity::new(units).is_ok(), (1..=1000).contains(&units));
        }

        #[test]
        fn order_id_display_parses_back(v in any::<u128>()) {
            let id = OrderId::from_u128(v);
            prop_assert_eq!(OrderId::parse(&id.to_string()), Ok(id));
        }
    }
}
