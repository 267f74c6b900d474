//! Key layout of the single sled tree (see the crate docs for the table).
//!
//! Every key starts with a one-letter keyspace tag and a 0x00 separator, so one ordered tree holds
//! every kind of record and a commit group is one run of writes to it. Entity names may not
//! contain 0x00: that keeps `e\0<entity>\0<seq>` unambiguous (no entity's events fall inside
//! another entity's key range) and lets a range scan stop at `e\0<entity>\x01`.

use crate::error::StorageError;

pub(crate) const EVENT: u8 = b'e';
pub(crate) const SNAPSHOT: u8 = b's';
pub(crate) const OUTBOX: u8 = b'o';
pub(crate) const INBOX: u8 = b'i';
pub(crate) const IDEMPOTENCY: u8 = b'k';
pub(crate) const INDEX: u8 = b'x';

/// Meta key holding the layout version of the key space (written when a store is created).
pub(crate) const META_LAYOUT: &[u8] = b"m\0layout";
/// Meta key holding the next outbox id to hand out, so ids never go backwards, even when every
/// outbox entry has been acknowledged (deleted) before a restart.
pub(crate) const META_OUTBOX_NEXT: &[u8] = b"m\0outbox_next";
/// Meta key holding the number of commit groups ever applied. Compared at open with the number
/// recorded in the sentinel file at the last clean close, to detect an engine that recovered less
/// than was acknowledged.
pub(crate) const META_COMMIT_SEQ: &[u8] = b"m\0commit_seq";
/// Version of this key layout.
pub(crate) const LAYOUT_VERSION: u32 = 1;

/// `<tag>\0<name>`.
pub(crate) fn tagged(tag: u8, name: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + name.len());
    key.push(tag);
    key.push(0);
    key.extend_from_slice(name);
    key
}

/// `e\0<entity>\0`: the prefix of every event key of `entity`.
pub(crate) fn event_prefix(entity: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(3 + entity.len() + 8);
    key.push(EVENT);
    key.push(0);
    key.extend_from_slice(entity.as_bytes());
    key.push(0);
    key
}

/// `e\0<entity>\0<seq BE>`: big-endian so that byte order is seq order.
pub(crate) fn event_key(prefix: &[u8], seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + 8);
    key.extend_from_slice(prefix);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// `o\0<id BE>`.
pub(crate) fn outbox_key(id: u64) -> [u8; 10] {
    let mut key = [0u8; 10];
    key[0] = OUTBOX;
    key[2..].copy_from_slice(&id.to_be_bytes());
    key
}

/// The id of an outbox key, if it is one.
pub(crate) fn outbox_id(key: &[u8]) -> Option<u64> {
    match key {
        [OUTBOX, 0, id @ ..] => Some(u64::from_be_bytes(id.try_into().ok()?)),
        _ => None,
    }
}

/// The seq of an event key with the given prefix, if it has one.
pub(crate) fn event_seq(prefix: &[u8], key: &[u8]) -> Option<u64> {
    let tail = key.strip_prefix(prefix)?;
    Some(u64::from_be_bytes(tail.try_into().ok()?))
}

/// The smallest key greater than every key starting with `prefix`, or `None` if there is none
/// (prefix of 0xFF bytes only).
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Checks an entity name: non-empty, no 0x00 (the key separator).
pub(crate) fn check_entity(entity: &str) -> Result<(), StorageError> {
    if entity.is_empty() {
        return Err(StorageError::InvalidKey { reason: "empty entity name".to_owned() });
    }
    if entity.as_bytes().contains(&0) {
        return Err(StorageError::InvalidKey { reason: format!("entity name {entity:?} contains a 0x00 byte") });
    }
    Ok(())
}

/// Checks a message id or idempotency key: non-empty (it is the last key component, so 0x00 is
/// harmless there).
pub(crate) fn check_name(what: &str, name: &str) -> Result<(), StorageError> {
    if name.is_empty() {
        return Err(StorageError::InvalidKey { reason: format!("empty {what}") });
    }
    Ok(())
}

/// A printable description of a key for error messages: `e/order-1/#7`, `k/abc`, ...
pub(crate) fn describe(key: &[u8]) -> String {
    match key {
        [EVENT, 0, rest @ ..] if rest.len() > 9 && rest[rest.len() - 9] == 0 => {
            let (name, seq) = rest.split_at(rest.len() - 9);
            let seq = u64::from_be_bytes(seq[1..].try_into().unwrap_or([0; 8]));
            format!("e/{}/#{seq}", name.escape_ascii())
        }
        [OUTBOX, 0, ..] => match outbox_id(key) {
            Some(id) => format!("o/#{id}"),
            None => format!("{}", key.escape_ascii()),
        },
        [tag, 0, rest @ ..] => format!("{}/{}", char::from(*tag), rest.escape_ascii()),
        _ => format!("{}", key.escape_ascii()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_keys_sort_by_seq_and_stay_inside_their_entity() {
        let a = event_prefix("a");
        let ab = event_prefix("a\u{1}");
        let k1 = event_key(&a, 1);
        let k256 = event_key(&a, 256);
        assert!(k1 < k256);
        assert!(k256 < prefix_end(&a).expect("has end"));
        assert!(event_key(&ab, 0) >= prefix_end(&a).expect("has end"));
        assert_eq!(event_seq(&a, &k256), Some(256));
        assert_eq!(describe(&k256), "e/a/#256");
    }

    #[test]
    fn outbox_keys_roundtrip() {
        let key = outbox_key(42);
        assert_eq!(outbox_id(&key), Some(42));
        assert_eq!(outbox_id(b"o\0short"), None);
        assert_eq!(describe(&key), "o/#42");
    }

    #[test]
    fn prefix_end_handles_ff() {
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }

    #[test]
    fn entity_names_are_checked() {
        assert!(check_entity("order-1").is_ok());
        assert!(check_entity("").is_err());
        assert!(check_entity("a\0b").is_err());
    }
}
