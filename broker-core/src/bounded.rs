//! Untrusted text made small before it is stored or echoed: [`field`] for audit records,
//! [`echo`] for error messages. Both have a fixed maximum size whatever the input.

use std::borrow::Cow;

use sha2::{Digest, Sha256};

/// Bytes of escaped input an error message or a digest form keeps.
pub const PREFIX_BYTES: usize = 128;

/// Longest [`echo`] output, in bytes.
pub const MAX_ECHO_BYTES: usize = PREFIX_BYTES + 32;

/// Longest digest form [`field`] makes, in bytes.
pub const MAX_DIGEST_FORM_BYTES: usize = PREFIX_BYTES + 100;

/// `s` with control characters, quotes and backslashes escaped, cut at a character boundary to
/// at most `max` bytes; and whether it was cut.
fn escaped_prefix(s: &str, max: usize) -> (String, bool) {
    let mut out = String::new();
    for c in s.chars() {
        let e: String = c.escape_debug().collect();
        if out.len() + e.len() > max {
            return (out, true);
        }
        out.push_str(&e);
    }
    (out, false)
}

/// `s` for an error message: escaped, at most [`PREFIX_BYTES`] of it, then `…(N bytes)` when
/// cut. At most [`MAX_ECHO_BYTES`] bytes.
pub fn echo(s: &str) -> String {
    let (mut out, cut) = escaped_prefix(s, PREFIX_BYTES);
    if cut {
        out.push_str(&format!("…({} bytes)", s.len()));
    }
    out
}

/// An error message cut to at most `max` bytes (at a character boundary, `…` marking the cut),
/// control characters escaped. For messages that may hold parts of the input (a parser's).
pub fn message(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    for c in s.chars() {
        let e: Cow<'_, str> = if c.is_control() {
            Cow::Owned(c.escape_debug().collect())
        } else {
            Cow::Owned(c.to_string())
        };
        if out.len() + e.len() > max.saturating_sub('…'.len_utf8()) {
            out.push('…');
            return out;
        }
        out.push_str(&e);
    }
    out
}

/// `s` as an audit record may hold it: unchanged when it has at most `max` bytes, no control
/// character and nothing shaped like a token; otherwise its digest form
/// `<escaped prefix>…[sha256:<hex> len:<bytes>]` (no prefix when it looks like a token), at
/// most [`MAX_DIGEST_FORM_BYTES`] bytes. Idempotent: a digest form is kept as it is.
pub fn field(s: &str, max: usize) -> Cow<'_, str> {
    let token = crate::audit::looks_like_jwt(s);
    if s.len() <= max && !token && !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let prefix = if token {
        String::new()
    } else {
        escaped_prefix(s, PREFIX_BYTES).0
    };
    Cow::Owned(format!(
        "{prefix}…[sha256:{} len:{}]",
        hex::encode(Sha256::digest(s.as_bytes())),
        s.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_keeps_a_short_escaped_prefix() {
        assert_eq!(echo("team/db"), "team/db");
        assert_eq!(echo("a\nb\"c"), "a\\nb\\\"c");
        let long = "é\u{1}".repeat(1 << 20);
        let e = echo(&long);
        assert!(e.len() <= MAX_ECHO_BYTES, "{}", e.len());
        assert!(e.ends_with(&format!("…({} bytes)", long.len())), "{e}");
        assert!(!e.chars().any(char::is_control));
        // Exactly at the limit: not cut.
        assert_eq!(echo(&"a".repeat(PREFIX_BYTES)), "a".repeat(PREFIX_BYTES));
    }

    #[test]
    fn message_is_cut_at_its_bound() {
        let m = message(&format!("bad value: {}\u{7}", "x".repeat(10_000)), 200);
        assert!(m.len() <= 200 && m.ends_with('…'), "{}", m.len());
        assert_eq!(message("a\u{7}b", 200), "a\\u{7}b");
    }

    #[test]
    fn field_keeps_short_values_and_digests_the_rest() {
        assert_eq!(field("team/app", 1024), Cow::Borrowed("team/app"));
        let long = "p/".repeat(600_000);
        let f = field(&long, 1024);
        assert!(f.len() <= MAX_DIGEST_FORM_BYTES, "{}", f.len());
        assert!(f.starts_with("p/p/"));
        assert!(f.ends_with(&format!(
            "[sha256:{} len:{}]",
            hex::encode(Sha256::digest(long.as_bytes())),
            long.len()
        )));
        // Idempotent, so a record bounded twice is the same record.
        assert_eq!(field(&f, 1024), f);
        // Control characters: digest form, escaped.
        let c = field("a\nb", 1024);
        assert!(c.starts_with("a\\nb…[sha256:"), "{c}");
        assert!(!c.chars().any(char::is_control));
        // Worst-case prefix (every byte escaped to several) stays in bound.
        let worst = "\u{1}\"\\".repeat(5000);
        let w = field(&worst, 1024);
        assert!(w.len() <= MAX_DIGEST_FORM_BYTES, "{}", w.len());
    }

    #[test]
    fn a_token_is_never_kept_even_in_part() {
        let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlc2lnbmF0dXJl";
        let f = field(jwt, 1024);
        assert!(f.starts_with("…[sha256:"), "{f}");
        assert!(!f.contains("eyJ"));
    }
}
