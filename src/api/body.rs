//! Reading JSON request bodies as their JSON Schemas describe them.
//!
//! - Numbers as JSON Schema reads them: `3.0` is an integer. serde refuses a float for an
//!   integer field, so request bodies have their integral floats turned into integers
//!   before they are deserialized (a schema-valid `{"replicas": 3.0}` is not refused).
//! - An object body is an object: serde would also read a struct from a JSON array of
//!   its fields in order (`["w1", 42]` as `{"worker_id": "w1", "pid": 42}`).

use serde::de::DeserializeOwned;
use serde_json::{Number, Value};

use super::ApiError;

/// Deserializes `body`, which must be a JSON object; anything else, or an object `T`
/// refuses, is a 400 `invalid_body` whose message starts with `expected`.
pub fn from_object<T: DeserializeOwned>(body: Value, expected: &str) -> Result<T, ApiError> {
    if !body.is_object() {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!("expected {expected}: the body must be a JSON object"),
        ));
    }
    serde_json::from_value(body)
        .map_err(|e| ApiError::bad_request("invalid_body", format!("expected {expected}: {e}")))
}

/// Rewrites every float in `value` that has no fractional part and fits an `i64` or a
/// `u64` as that integer. Other numbers are left as they are.
pub fn integral_floats_to_integers(value: &mut Value) {
    match value {
        Value::Number(n) if n.is_f64() => {
            if let Some(integer) = n.as_f64().and_then(integer_of) {
                *n = integer;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_floats_to_integers),
        Value::Object(fields) => fields.values_mut().for_each(integral_floats_to_integers),
        _ => {}
    }
}

fn integer_of(f: f64) -> Option<Number> {
    // 2^63 and 2^64 are exact as f64; every integral f64 below them fits.
    const TWO_63: f64 = 9_223_372_036_854_775_808.0;
    const TWO_64: f64 = 18_446_744_073_709_551_616.0;
    if !f.is_finite() || f.fract() != 0.0 {
        return None;
    }
    if (-TWO_63..TWO_63).contains(&f) {
        Some(Number::from(f as i64))
    } else if (0.0..TWO_64).contains(&f) {
        Some(Number::from(f as u64))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn object_bodies_must_be_objects() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Report {
            worker_id: String,
            pid: u32,
        }
        assert!(from_object::<Report>(json!({"worker_id": "w", "pid": 1}), "{worker_id}").is_ok());
        for bad in [
            json!(["w", 1]),
            json!(null),
            json!("w"),
            json!({"worker_id": 1, "pid": 1}),
        ] {
            let e = from_object::<Report>(bad.clone(), "{worker_id}").unwrap_err();
            assert_eq!(e.code, "invalid_body", "{bad}");
        }
    }

    #[test]
    fn integral_floats_become_integers_and_nothing_else_changes() {
        let mut v =
            json!({"a": 3.0, "b": [-2.0, 1.5, 1e300, 1.8e19], "c": {"d": 0.0, "e": "4.0", "f": 7}});
        integral_floats_to_integers(&mut v);
        assert_eq!(
            v,
            json!({"a": 3, "b": [-2, 1.5, 1e300, 18_000_000_000_000_000_000u64], "c": {"d": 0, "e": "4.0", "f": 7}})
        );
        assert!(v["a"].is_u64() && v["b"][0].is_i64() && v["b"][1].is_f64());
    }
}
