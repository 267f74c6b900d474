//! The one place that knows the binary format of persisted records (and of wire payloads that
//! choose to use it).
//!
//! Format: `[MAGIC, FORMAT_VERSION]` followed by the bincode 2 (serde, `standard()` config:
//! little-endian varints) encoding of the value.
//!
//! Why the header: bincode is not self-describing, so adding a field to a struct silently changes
//! how old bytes decode. The version byte lets a future decoder recognise old records and migrate
//! them instead of misreading them, and the magic byte catches records that are not ours at all
//! (a raw event stored by mistake, a torn write) before bincode tries to make sense of them.
//!
//! Why only here: bincode 3.0.0 is a tombstone and 2.x may need replacing (postcard, wincode);
//! keeping every use in this file makes that a one-file change.
//!
//! Decoding never panics and never allocates more than [`DECODE_LIMIT`] for one record, whatever
//! the input bytes claim.

use bincode::config::{Configuration, Limit, LittleEndian, Varint};

/// First byte of every record.
pub const MAGIC: u8 = 0xA5;
/// Second byte of every record: the version of the payload layout.
pub const FORMAT_VERSION: u8 = 1;
/// Length of the `[MAGIC, FORMAT_VERSION]` header.
pub const HEADER_LEN: usize = 2;
/// Largest payload a decode will accept (bytes bincode may claim for strings and sequences).
pub const DECODE_LIMIT: usize = 16 * 1024 * 1024;

type Config = Configuration<LittleEndian, Varint, Limit<DECODE_LIMIT>>;

fn config() -> Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

/// Why bytes could not be encoded or decoded. The bincode error is kept as text so that no
/// bincode type leaks out of this module.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// Fewer bytes than the header.
    #[error("record too short: {len} bytes, need at least {HEADER_LEN}")]
    TooShort {
        /// How many bytes there were.
        len: usize,
    },
    /// The first byte is not [`MAGIC`].
    #[error("bad magic byte {found:#04x}, expected {MAGIC:#04x}")]
    BadMagic {
        /// The byte found.
        found: u8,
    },
    /// The version byte is one this build does not know.
    #[error("unknown format version {found}, this build reads version {FORMAT_VERSION}")]
    UnknownVersion {
        /// The version found.
        found: u8,
    },
    /// bincode rejected the payload (truncated, invalid, over the size limit).
    #[error("cannot decode payload: {0}")]
    Decode(String),
    /// The payload decoded but bytes were left over: the record is not what we think it is.
    #[error("{extra} trailing bytes after the payload")]
    TrailingBytes {
        /// How many bytes were left.
        extra: usize,
    },
    /// bincode could not encode the value (a serde impl that errors, say).
    #[error("cannot encode value: {0}")]
    Encode(String),
}

/// Encodes `value` as a versioned record: header then bincode payload.
pub fn encode<T: serde::Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(64);
    out.push(MAGIC);
    out.push(FORMAT_VERSION);
    bincode::serde::encode_into_std_write(value, &mut out, config()).map_err(|e| CodecError::Encode(e.to_string()))?;
    Ok(out)
}

/// Decodes a record made by [`encode`]. Errors (never panics) on short input, wrong magic,
/// unknown version, a payload bincode rejects, or trailing bytes.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let payload = check_header(bytes)?;
    let (value, used) =
        bincode::serde::decode_from_slice::<T, _>(payload, config()).map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != payload.len() {
        return Err(CodecError::TrailingBytes { extra: payload.len() - used });
    }
    Ok(value)
}

/// Checks the header and returns the payload after it.
fn check_header(bytes: &[u8]) -> Result<&[u8], CodecError> {
    match bytes {
        [MAGIC, FORMAT_VERSION, payload @ ..] => Ok(payload),
        [MAGIC, found, ..] => Err(CodecError::UnknownVersion { found: *found }),
        [found, _, ..] => Err(CodecError::BadMagic { found: *found }),
        _ => Err(CodecError::TooShort { len: bytes.len() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum Kind {
        Placed,
        Reserved { sku: String, qty: u32 },
        Charged(i64),
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Sample {
        id: u64,
        name: String,
        tags: Vec<String>,
        blob: Vec<u8>,
        maybe: Option<i32>,
        kind: Kind,
        ok: bool,
    }

    fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![
            Just(Kind::Placed),
            (".{0,12}", any::<u32>()).prop_map(|(sku, qty)| Kind::Reserved { sku, qty }),
            any::<i64>().prop_map(Kind::Charged),
        ]
    }

    fn sample() -> impl Strategy<Value = Sample> {
        (
            any::<u64>(),
            ".{0,20}",
            proptest::collection::vec(".{0,8}", 0..4),
            proptest::collection::vec(any::<u8>(), 0..64),
            any::<Option<i32>>(),
            kind(),
            any::<bool>(),
        )
            .prop_map(|(id, name, tags, blob, maybe, kind, ok)| Sample {
                id,
                name,
                tags,
                blob,
                maybe,
                kind,
                ok,
            })
    }

    proptest! {
        #[test]
        fn decode_of_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<Sample>(&bytes);
            let _ = decode::<u64>(&bytes);
            let _ = decode::<Vec<String>>(&bytes);
        }

        #[test]
        fn decode_of_arbitrary_payload_after_valid_header_never_panics(
            payload in proptest::collection::vec(any::<u8>(), 0..256)
        ) {
            let mut bytes = vec![MAGIC, FORMAT_VERSION];
            bytes.extend_from_slice(&payload);
            let _ = decode::<Sample>(&bytes);
            let _ = decode::<Vec<Vec<u8>>>(&bytes);
        }

        #[test]
        fn roundtrip(value in sample()) {
            let bytes = encode(&value).expect("encode sample");
            prop_assert_eq!(&bytes[..HEADER_LEN], &[MAGIC, FORMAT_VERSION]);
            let back: Sample = decode(&bytes).expect("decode sample");
            prop_assert_eq!(back, value);
        }

        #[test]
        fn every_truncation_is_an_error(value in sample()) {
            let bytes = encode(&value).expect("encode sample");
            for len in 0..bytes.len() {
                prop_assert!(decode::<Sample>(&bytes[..len]).is_err(), "truncation to {} decoded", len);
            }
        }

        #[test]
        fn trailing_bytes_are_an_error(value in sample(), extra in proptest::collection::vec(any::<u8>(), 1..8)) {
            let mut bytes = encode(&value).expect("encode sample");
            bytes.extend_from_slice(&extra);
            prop_assert!(decode::<Sample>(&bytes).is_err());
        }
    }

    #[test]
    fn header_errors_say_what_is_wrong() {
        assert_eq!(decode::<u64>(&[]), Err(CodecError::TooShort { len: 0 }));
        assert_eq!(decode::<u64>(&[MAGIC]), Err(CodecError::TooShort { len: 1 }));
        assert_eq!(decode::<u64>(&[0x00, FORMAT_VERSION, 1]), Err(CodecError::BadMagic { found: 0 }));
        let err = decode::<u64>(&[MAGIC, 9, 1]).expect_err("version 9 is unknown");
        assert_eq!(err, CodecError::UnknownVersion { found: 9 });
        assert!(err.to_string().contains("version 9"), "{err}");
        let mut bytes = encode(&7u64).expect("encode u64");
        bytes.push(0);
        assert_eq!(decode::<u64>(&bytes), Err(CodecError::TrailingBytes { extra: 1 }));
    }

    #[test]
    fn huge_claimed_length_is_refused_without_allocating_it() {
        // A varint length of u64::MAX-ish for a Vec<u8>: must be an error, not an OOM abort.
        let mut bytes = vec![MAGIC, FORMAT_VERSION, 0xFF];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode::<Vec<u8>>(&bytes), Err(CodecError::Decode(_))));
        let mut bytes = vec![MAGIC, FORMAT_VERSION, 0xFF];
        bytes.extend_from_slice(&((DECODE_LIMIT as u64) + 1).to_le_bytes());
        assert!(decode::<String>(&bytes).is_err());
    }
}
