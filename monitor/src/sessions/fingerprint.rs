//! Keyed fingerprints of credentials: HMAC-SHA-256 under a per-deployment key. Two agents with
//! the same key give the same fingerprint for the same token, so alerts correlate across a fleet,
//! while a fingerprint reveals nothing about the token to anyone without the key.

use std::{
    fs,
    io::{Read, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
};

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const DEFAULT_KEY_FILE: &str = "/var/lib/monitor/fingerprint.key";
const KEY_LEN: usize = 32;

/// A raw secret on its way to being fingerprinted. It has no Display, its Debug is redacted,
/// and it is only ever serialized on the root-only control socket.
#[derive(Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The raw value, for the HMAC only.
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

#[derive(Clone)]
pub struct FingerprintKey([u8; KEY_LEN]);

impl std::fmt::Debug for FingerprintKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FingerprintKey([redacted])")
    }
}

impl FingerprintKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// Loads the key, or generates one (from the kernel's CSPRNG) and stores it root-only.
    pub fn load_or_create(path: &Path) -> std::io::Result<Self> {
        match fs::read(path) {
            Ok(bytes) => {
                let key: [u8; KEY_LEN] = bytes.as_slice().try_into().map_err(|_| {
                    std::io::Error::other(format!(
                        "{}: expected {KEY_LEN} bytes, found {}",
                        path.display(),
                        bytes.len()
                    ))
                })?;
                Ok(Self(key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; KEY_LEN];
                fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
                if let Some(dir) = path.parent() {
                    fs::create_dir_all(dir)?;
                    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
                }
                let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
                f.write_all(&key)?;
                f.sync_all()?;
                Ok(Self(key))
            }
            Err(e) => Err(e),
        }
    }

    /// `hmac-sha256:` and the first 128 bits of the MAC in hex.
    pub fn fingerprint(&self, secret: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC accepts any key length");
        mac.update(secret);
        let tag = mac.finalize().into_bytes();
        format!("hmac-sha256:{}", crate::hex::lower(&tag[..16]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_keyed_stable_and_hides_the_value() {
        let a = FingerprintKey::from_bytes([1; KEY_LEN]);
        let b = FingerprintKey::from_bytes([2; KEY_LEN]);
        let fa = a.fingerprint(b"tok-123");
        assert_eq!(fa, a.fingerprint(b"tok-123"));
        assert_ne!(fa, b.fingerprint(b"tok-123"));
        assert_ne!(fa, a.fingerprint(b"tok-124"));
        assert!(!fa.contains("tok-123"));
        assert_eq!(fa.len(), "hmac-sha256:".len() + 32);
        assert_eq!(format!("{:?}", Secret::new("tok-123".into())), "Secret([redacted])");
    }

    #[test]
    fn key_is_created_root_only_and_reloaded() {
        let dir = std::env::temp_dir().join(format!("monitor-key-{}", std::process::id()));
        let path = dir.join("k");
        let k1 = FingerprintKey::load_or_create(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let k2 = FingerprintKey::load_or_create(&path).unwrap();
        assert_eq!(k1.fingerprint(b"x"), k2.fingerprint(b"x"));
        fs::remove_dir_all(dir).unwrap();
    }
}
