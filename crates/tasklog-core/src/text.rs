//! What text tasklog can keep: every string a spec or report carries ends up in Postgres
//! (`text`, `jsonb`), which refuses the NUL character (U+0000) wherever it appears. The
//! API refuses such input up front, naming the field, instead of accepting what the
//! projection could never store.

use serde_json::Value;

/// The path of the first string or object key in `value` that holds a NUL, like
/// `env.A`, `command[2]` or `env.<key "A\u{0}">` (a key itself). `None` when there is
/// none. Pure.
pub fn nul_path(value: &Value) -> Option<String> {
    fn walk(value: &Value, path: &mut String) -> bool {
        match value {
            Value::String(s) => s.contains('\0'),
            Value::Array(items) => items.iter().enumerate().any(|(i, item)| {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                let found = walk(item, path);
                if !found {
                    path.truncate(len);
                }
                found
            }),
            Value::Object(map) => map.iter().any(|(key, item)| {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                if key.contains('\0') {
                    path.push_str(&format!("<key {key:?}>"));
                    return true;
                }
                path.push_str(key);
                let found = walk(item, path);
                if !found {
                    path.truncate(len);
                }
                found
            }),
            _ => false,
        }
    }
    let mut path = String::new();
    walk(value, &mut path).then(|| {
        if path.is_empty() {
            "(the body)".to_string()
        } else {
            path
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_nul_in_values_keys_and_arrays() {
        assert_eq!(nul_path(&json!({"name": "ok", "env": {"A": "x"}})), None);
        assert_eq!(
            nul_path(&json!({"name": "ok", "env": {"A": "x\u{0}"}})).as_deref(),
            Some("env.A")
        );
        assert_eq!(
            nul_path(&json!({"command": ["a", "b", "\u{0}"]})).as_deref(),
            Some("command[2]")
        );
        assert_eq!(
            nul_path(&json!({"env": {"A\u{0}": "x"}})).as_deref(),
            Some("env.<key \"A\\0\">")
        );
        assert_eq!(
            nul_path(&json!({"tasks": [{"name": "a"}, {"labels": {"k": "\u{0}"}}]})).as_deref(),
            Some("tasks[1].labels.k")
        );
        assert_eq!(nul_path(&json!("\u{0}")).as_deref(), Some("(the body)"));
        assert_eq!(nul_path(&json!([1, 2.5, null, true])), None);
    }
}
