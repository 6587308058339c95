//! Random values from the OS CSPRNG: labels, PINs, credentials, test data.

use zeroize::Zeroizing;

use crate::{Error, Result};

/// `N` bytes from the OS CSPRNG.
pub fn bytes<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(Error::Random)?;
    Ok(b)
}

/// 32 hex characters from the OS CSPRNG (a PIN or a credential), zeroized on drop.
pub fn pin() -> Result<Zeroizing<String>> {
    let mut b = Zeroizing::new([0u8; 16]);
    getrandom::fill(&mut b[..]).map_err(Error::Random)?;
    Ok(Zeroizing::new(hex::encode(&b[..])))
}

/// `prefix` followed by 8 random hex characters (a token label, a name).
pub fn label(prefix: &str) -> Result<String> {
    Ok(format!("{prefix}{}", hex::encode(bytes::<4>()?)))
}
