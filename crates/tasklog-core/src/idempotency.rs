//! Idempotency keys: a client-chosen key names one task forever (a UUIDv5 of the key), so
//! that resubmitting after a timeout or a crash gives the same task, never a second one.

use uuid::Uuid;

/// Namespace of task ids derived from idempotency keys (UUIDv5).
pub const NAMESPACE: Uuid = Uuid::from_u128(0x6b1d_3c1e_4f0a_4e8b_9a57_2c6d_1e3f_7a90);

/// Longest idempotency key, in bytes (the spec's field and the header alike).
pub const MAX_KEY_BYTES: usize = 256;

/// The task id for an idempotency key: the same key always names the same task.
pub fn task_id_for_key(key: &str) -> Uuid {
    Uuid::new_v5(&NAMESPACE, key.as_bytes())
}

/// Reads an `Idempotency-Key` header value: 1 to [`MAX_KEY_BYTES`] visible ASCII
/// characters, spaces allowed inside but not at either end (tabs and other control
/// characters refused). `None` when the value is not such a key.
pub fn header_key(value: &[u8]) -> Option<&str> {
    let visible = |b: &u8| (b'!'..=b'~').contains(b);
    let ok = !value.is_empty()
        && value.len() <= MAX_KEY_BYTES
        && value.iter().all(|b| *b == b' ' || visible(b))
        && value.first().is_some_and(visible)
        && value.last().is_some_and(visible);
    if !ok {
        return None;
    }
    std::str::from_utf8(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_stable_tasks() {
        assert_eq!(task_id_for_key("abc"), task_id_for_key("abc"));
        assert_ne!(task_id_for_key("abc"), task_id_for_key("abd"));
    }

    #[test]
    fn header_keys_are_visible_ascii() {
        assert_eq!(header_key(b"order-42"), Some("order-42"));
        assert_eq!(header_key(b"a b"), Some("a b"));
        assert_eq!(
            header_key(&[b'k'; MAX_KEY_BYTES]).map(str::len),
            Some(MAX_KEY_BYTES)
        );
        for bad in [
            &b""[..],
            b" a",
            b"a ",
            b"a\tb",
            b"\x7f",
            "é".as_bytes(),
            &[b'k'; MAX_KEY_BYTES + 1],
        ] {
            assert_eq!(header_key(bad), None, "{bad:?}");
        }
    }
}
