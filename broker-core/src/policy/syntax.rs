//! The syntax of paths, name patterns and policy names.

use super::*;

// ---------------------------------------------------------------------------------------------
// Syntax
// ---------------------------------------------------------------------------------------------

pub(super) fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// Checks a concrete secret path: non-empty, at most [`MAX_PATH_LEN`] bytes, `/`-separated
/// segments of ASCII letters, digits, `-`, `_` and `.`; no empty, `.` or `..` segment, no
/// leading or trailing `/`. [`PolicySet::evaluate`] denies any path this refuses.
pub fn validate_secret_path(path: &str) -> Result<(), Malformed> {
    check_path(path, false)
}

/// Checks a concrete path (`wildcards == false`) or a path pattern (`true`).
pub(super) fn check_path(path: &str, wildcards: bool) -> Result<(), Malformed> {
    if path.is_empty() {
        return Err(Malformed::Empty);
    }
    if path.len() > MAX_PATH_LEN {
        return Err(Malformed::TooLong { max: MAX_PATH_LEN });
    }
    if path.starts_with('/') {
        return Err(Malformed::LeadingSlash);
    }
    if path.ends_with('/') {
        return Err(Malformed::TrailingSlash);
    }
    let mut previous_double_star = false;
    for segment in path.split('/') {
        if segment.is_empty() {
            return Err(Malformed::EmptySegment);
        }
        if segment == "." || segment == ".." {
            return Err(Malformed::DotSegment);
        }
        if let Some(c) = segment
            .chars()
            .find(|&c| !(is_path_char(c) || (wildcards && c == '*')))
        {
            return Err(Malformed::Char(c));
        }
        let double_star = segment == DOUBLE_STAR;
        if (double_star && previous_double_star) || (!double_star && segment.contains("**")) {
            return Err(Malformed::DoubleStar);
        }
        previous_double_star = double_star;
    }
    Ok(())
}

/// Checks a namespace or service account pattern: lowercase letters, digits, `-`, `*`, and
/// `.` when `dots` (service accounts are DNS subdomains, namespaces DNS labels).
pub(super) fn check_name_pattern(pattern: &str, dots: bool) -> Result<(), Malformed> {
    if pattern.is_empty() {
        return Err(Malformed::Empty);
    }
    if pattern.len() > MAX_NAME_LEN {
        return Err(Malformed::TooLong { max: MAX_NAME_LEN });
    }
    match pattern.chars().find(|&c| {
        !(c.is_ascii_lowercase()
            || c.is_ascii_digit()
            || c == '-'
            || c == '*'
            || (dots && c == '.'))
    }) {
        Some(c) => Err(Malformed::Char(c)),
        None => Ok(()),
    }
}

/// Checks a policy name: ASCII letters, digits, `-`, `_`, `.`; it goes into logs and audit.
pub(super) fn check_policy_name(name: &str) -> Result<(), Malformed> {
    if name.len() > MAX_NAME_LEN {
        return Err(Malformed::TooLong { max: MAX_NAME_LEN });
    }
    match name.chars().find(|&c| !is_path_char(c)) {
        Some(c) => Err(Malformed::Char(c)),
        None => Ok(()),
    }
}
