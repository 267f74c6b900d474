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
/// Keyspaces no build writes any more, removed when a store opens (and their tags never
/// reused): `i`, inbox marks, until consumers deduplicated integration events by entity state.
pub(crate) const RETIRED: &[(u8, &str)] = &[(b'i', "inbox marks")];
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
    let mut key = Vec::with_capacity(prefix.len() + 9);
    key.extend_from_slice(prefix);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// Most events one packed record holds (its count is one byte).
pub(crate) const MAX_PACKED: usize = u8::MAX as usize;

/// `e\0<entity>\0<last seq BE><count u8>`: `count` (2 to 255) events of one append, seqs
/// `last - count + 1 ..= last`, in one record (see [`pack_events`]). Keyed by the last seq, so
/// the entity's last key still gives its version, and a range starting at any seq the record
/// covers still reaches it.
pub(crate) fn packed_event_key(prefix: &[u8], last_seq: u64, count: u8) -> Vec<u8> {
    let mut key = event_key(prefix, last_seq);
    key.push(count);
    key
}

/// The last seq and the number of events of an event key with the given prefix (a plain key
/// holds one event), if it is one.
pub(crate) fn event_seq(prefix: &[u8], key: &[u8]) -> Option<(u64, u8)> {
    let tail = key.strip_prefix(prefix)?;
    let (seq, count) = match tail {
        [seq @ .., count] if tail.len() == 9 && *count >= 2 => (seq, *count),
        seq if seq.len() == 8 => (seq, 1),
        _ => return None,
    };
    let last = u64::from_be_bytes(seq.try_into().ok()?);
    (last >= u64::from(count)).then_some((last, count))
}

/// The entity prefix (`e\0<entity>\0`) of an event key, if it is one.
pub(crate) fn event_key_prefix(key: &[u8]) -> Option<&[u8]> {
    let name = key.strip_prefix(&[EVENT, 0])?;
    let end = name.iter().position(|b| *b == 0)?;
    Some(&key[..2 + end + 1])
}

/// The events a record holds (one, or `count` packed).
pub(crate) fn record_events(value: &[u8], count: u8) -> Option<Vec<Vec<u8>>> {
    if count == 1 { Some(vec![value.to_vec()]) } else { unpack_events(value, count) }
}

/// The value of a packed record: each event as `len u32 LE` + bytes.
pub(crate) fn pack_events(events: &[Vec<u8>]) -> Vec<u8> {
    let mut value = Vec::with_capacity(events.iter().map(|e| 4 + e.len()).sum());
    for event in events {
        value.extend_from_slice(&(event.len() as u32).to_le_bytes());
        value.extend_from_slice(event);
    }
    value
}

/// The events of a packed record, or `None` if the value does not hold exactly `count`.
pub(crate) fn unpack_events(value: &[u8], count: u8) -> Option<Vec<Vec<u8>>> {
    let mut events = Vec::with_capacity(usize::from(count));
    let mut rest = value;
    while !rest.is_empty() {
        let (len, tail) = rest.split_first_chunk::<4>()?;
        let len = u32::from_le_bytes(*len) as usize;
        if tail.len() < len {
            return None;
        }
        events.push(tail[..len].to_vec());
        rest = &tail[len..];
    }
    (events.len() == usize::from(count)).then_some(events)
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

/// Checks an idempotency key: non-empty (it is the last key component, so 0x00 is
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
        // Packed first: in a plain key the byte 10 from the end is part of the (0x00-free) name.
        [EVENT, 0, rest @ ..] if rest.len() > 10 && rest[rest.len() - 10] == 0 => {
            let (name, tail) = rest.split_at(rest.len() - 10);
            let last = u64::from_be_bytes(tail[1..9].try_into().unwrap_or([0; 8]));
            let first = last.saturating_sub(u64::from(tail[9])) + 1;
            format!("e/{}/#{first}-{last}", name.escape_ascii())
        }
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
        assert_eq!(event_seq(&a, &k256), Some((256, 1)));
        assert_eq!(describe(&k256), "e/a/#256");
    }

    #[test]
    fn packed_records_sort_by_their_last_seq_and_roundtrip() {
        let a = event_prefix("a");
        let packed = packed_event_key(&a, 7, 3); // events 5, 6, 7
        assert!(event_key(&a, 4) < event_key(&a, 5));
        // A range from any seq the record covers reaches it; one from after it does not.
        for from in 5..=7 {
            assert!(event_key(&a, from) <= packed, "from {from}");
        }
        assert!(event_key(&a, 8) > packed);
        assert!(packed < prefix_end(&a).expect("has end"));
        assert_eq!(event_seq(&a, &packed), Some((7, 3)));
        assert_eq!(describe(&packed), "e/a/#5-7");
        // Counts of 0 and 1 are never written packed; a count past the seq is malformed.
        assert_eq!(event_seq(&a, &packed_event_key(&a, 7, 1)), None);
        assert_eq!(event_seq(&a, &packed_event_key(&a, 2, 3)), None);

        let events = vec![b"x".to_vec(), Vec::new(), b"yz".to_vec()];
        let value = pack_events(&events);
        assert_eq!(unpack_events(&value, 3), Some(events));
        assert_eq!(unpack_events(&value, 2), None);
        assert_eq!(unpack_events(&value[..value.len() - 1], 3), None);
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
