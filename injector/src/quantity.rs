//! Kubernetes resource quantities (`500m`, `64Mi`, `1.5`, `1e3`), parsed far enough to compare
//! an annotation's value with the configured bound. The text is kept as given: it is what
//! goes into the pod.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

/// A non-negative quantity: the text as written and its value in base units (cores, bytes).
#[derive(Debug, Clone, PartialEq)]
pub struct Quantity {
    text: String,
    value: f64,
}

impl Quantity {
    /// The quantity as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The value in base units.
    pub fn value(&self) -> f64 {
        self.value
    }
}

impl PartialOrd for Quantity {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        self.value.partial_cmp(&other.value)
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Why a quantity was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a Kubernetes quantity (such as 100m, 64Mi, 0.5)")]
pub struct QuantityError(String);

impl FromStr for Quantity {
    type Err = QuantityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || QuantityError(s.chars().take(32).collect());
        if s.is_empty() || s.len() > 32 {
            return Err(bad());
        }
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
            .unwrap_or(s.len());
        let (number, suffix) = s.split_at(split);
        let digits = number.strip_prefix('+').unwrap_or(number);
        if digits.is_empty()
            || digits.starts_with('.') && digits.len() == 1
            || digits.matches('.').count() > 1
            || digits.contains('+')
        {
            return Err(bad());
        }
        let base: f64 = digits.parse().map_err(|_| bad())?;
        let multiplier = match suffix {
            "" => 1.0,
            "n" => 1e-9,
            "u" => 1e-6,
            "m" => 1e-3,
            "k" => 1e3,
            "M" => 1e6,
            "G" => 1e9,
            "T" => 1e12,
            "P" => 1e15,
            "E" => 1e18,
            "Ki" => 1024f64,
            "Mi" => 1024f64.powi(2),
            "Gi" => 1024f64.powi(3),
            "Ti" => 1024f64.powi(4),
            "Pi" => 1024f64.powi(5),
            "Ei" => 1024f64.powi(6),
            e if e.starts_with(['e', 'E']) => {
                let exp: i32 = e[1..].parse().map_err(|_| bad())?;
                if !(-30..=30).contains(&exp) {
                    return Err(bad());
                }
                10f64.powi(exp)
            }
            _ => return Err(bad()),
        };
        let value = base * multiplier;
        if !value.is_finite() {
            return Err(bad());
        }
        Ok(Quantity {
            text: s.to_owned(),
            value,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn q(s: &str) -> f64 {
        s.parse::<Quantity>().unwrap().value()
    }

    #[test]
    fn parses_the_suffixes_kubernetes_accepts() {
        assert_eq!(q("500m"), 0.5);
        assert_eq!(q("2"), 2.0);
        assert_eq!(q("0.25"), 0.25);
        assert_eq!(q("64Mi"), 64.0 * 1024.0 * 1024.0);
        assert_eq!(q("1Gi"), 1024f64.powi(3));
        assert_eq!(q("128M"), 128e6);
        assert_eq!(q("1e3"), 1000.0);
        assert_eq!(q("+1k"), 1000.0);
        assert!("256Mi".parse::<Quantity>().unwrap() > "200M".parse::<Quantity>().unwrap());
        assert_eq!("64Mi".parse::<Quantity>().unwrap().as_str(), "64Mi");
    }

    #[test]
    fn refuses_what_is_not_a_quantity() {
        for s in [
            "", "-1", "1.2.3", "Mi", "1mi", "1 Mi", "1e", "1e99", "abc", ".", "1+1", "1Mii",
        ] {
            assert!(s.parse::<Quantity>().is_err(), "{s:?} accepted");
        }
        let long = "9".repeat(40);
        let e = long.parse::<Quantity>().unwrap_err().to_string();
        assert!(e.len() < 100, "error echoes the whole input: {e}");
    }
}
