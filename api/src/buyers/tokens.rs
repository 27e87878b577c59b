//! Buyer tokens: signed, never stored.
//!
//! A token names its session, its account and its expiry, and carries an HMAC-SHA256 tag of
//! them under the deployment's token key:
//!
//! ```text
//! allotb1_<base64url, no padding, of: session id (16 bytes) | user id (8, big-endian)
//!                                   | expiry, Unix seconds (8, big-endian) | tag (32)>
//! ```
//!
//! Why signed rather than a random token stored as a hash: verifying it needs no lookup, so a
//! buyer's purchase costs no database or Redis round trip more than an anonymous one, on any
//! API instance that shares the key. What a signature cannot say by itself, that the buyer
//! logged out, comes from the `sessions` table: see [`super::sessions`]. The server keeps
//! nothing secret about a token but the key; the database holds no token at all.
//!
//! Pure: no clock (the caller passes `now`), no I/O. The tag is checked in constant time
//! ([`hmac::Mac::verify_slice`]) before anything in the token is believed.

use allot_shared::UserId;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// What every buyer token starts with (also what tells it from the staff token).
pub const PREFIX: &str = "allotb1_";
/// Signed claims, then the tag.
const PAYLOAD_LEN: usize = 32;
const TAG_LEN: usize = 32;
/// The length of a token: the prefix and 64 bytes in unpadded base64url.
pub const TOKEN_LEN: usize = PREFIX.len() + ((PAYLOAD_LEN + TAG_LEN) * 4).div_ceil(3);
/// Mixed into every tag, so that nothing else signed with the same key can pass for a token.
const DOMAIN: &[u8] = b"allot buyer token v1\0";

/// What a valid token says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claims {
    /// The login session (a `sessions` row), what a logout revokes.
    pub session: Uuid,
    /// The account.
    pub user: UserId,
    /// The token is refused from this instant on (whole seconds).
    pub expires_at: DateTime<Utc>,
}

/// Why a token is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a buyer token at all (wrong prefix, length or encoding).
    #[error("the bearer token is not a valid buyer token")]
    Malformed,
    /// Well-formed, but not signed with this deployment's key (forged, altered, or from
    /// another deployment).
    #[error("the bearer token is not a valid buyer token")]
    BadSignature,
    /// Genuine, but past its expiry: log in again.
    #[error("the bearer token has expired; log in again")]
    Expired,
}

/// The key tokens are signed with. Its `Debug` shows nothing of it.
#[derive(Clone)]
pub struct TokenKey([u8; 32]);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    /// The key derived from a deployment secret (any length; the derivation separates it from
    /// every other use of the same secret).
    pub fn derive(secret: &[u8]) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"allot buyer token key v1\0");
        hasher.update(secret);
        Self(hasher.finalize().into())
    }

    fn mac(&self) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        mac.update(DOMAIN);
        mac
    }

    /// The token of `claims`.
    pub fn issue(&self, claims: &Claims) -> String {
        let mut bytes = [0u8; PAYLOAD_LEN + TAG_LEN];
        bytes[..16].copy_from_slice(claims.session.as_bytes());
        bytes[16..24].copy_from_slice(&claims.user.get().to_be_bytes());
        bytes[24..32].copy_from_slice(&claims.expires_at.timestamp().to_be_bytes());
        let mut mac = self.mac();
        mac.update(&bytes[..PAYLOAD_LEN]);
        bytes[PAYLOAD_LEN..].copy_from_slice(&mac.finalize().into_bytes());
        let mut token = String::with_capacity(TOKEN_LEN);
        token.push_str(PREFIX);
        URL_SAFE_NO_PAD.encode_string(bytes, &mut token);
        token
    }

    /// The claims of `token` if this key signed it and it has not expired at `now`.
    pub fn verify(&self, token: &str, now: DateTime<Utc>) -> Result<Claims, TokenError> {
        let encoded = token
            .strip_prefix(PREFIX)
            .filter(|_| token.len() == TOKEN_LEN)
            .ok_or(TokenError::Malformed)?;
        let mut bytes = [0u8; PAYLOAD_LEN + TAG_LEN];
        // Strict: a non-canonical encoding (stray trailing bits) is refused, so one token has
        // exactly one spelling.
        match URL_SAFE_NO_PAD.decode_slice(encoded, &mut bytes) {
            Ok(len) if len == bytes.len() => {}
            _ => return Err(TokenError::Malformed),
        }
        let (payload, tag) = bytes.split_at(PAYLOAD_LEN);
        let mut mac = self.mac();
        mac.update(payload);
        mac.verify_slice(tag)
            .map_err(|_| TokenError::BadSignature)?;
        let field = |range: std::ops::Range<usize>| -> [u8; 8] {
            payload[range].try_into().expect("an 8-byte field")
        };
        let session = Uuid::from_slice(&payload[..16]).expect("a 16-byte session id");
        // Signed by us, so in range; refused rather than trusted if not.
        let user = UserId::try_from(i64::from_be_bytes(field(16..24)))
            .map_err(|_| TokenError::Malformed)?;
        let expires_at = DateTime::from_timestamp(i64::from_be_bytes(field(24..32)), 0)
            .ok_or(TokenError::Malformed)?;
        if now >= expires_at {
            return Err(TokenError::Expired);
        }
        Ok(Claims {
            session,
            user,
            expires_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn claims(session: u128, user: i64, expires: i64) -> Claims {
        Claims {
            session: Uuid::from_u128(session),
            user: UserId::try_from(user).unwrap(),
            expires_at: DateTime::from_timestamp(expires, 0).unwrap(),
        }
    }

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(secs, 0).unwrap()
    }

    #[test]
    fn a_token_has_the_documented_shape() {
        let token = TokenKey::derive(b"secret").issue(&claims(1, 1_000_000_000_000_001, 100));
        assert_eq!(token.len(), TOKEN_LEN);
        assert_eq!(TOKEN_LEN, 8 + 86);
        assert!(token.starts_with(PREFIX));
        assert!(
            token[PREFIX.len()..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
    }

    #[test]
    fn expiry_is_exclusive_and_other_strings_are_malformed() {
        let key = TokenKey::derive(b"secret");
        let token = key.issue(&claims(1, 7, 100));
        assert_eq!(key.verify(&token, at(99)), Ok(claims(1, 7, 100)));
        assert_eq!(key.verify(&token, at(100)), Err(TokenError::Expired));
        for bad in [
            "",
            PREFIX,
            "allot-dev-admin-token",
            &token[PREFIX.len()..],
            &token[..token.len() - 1],
            &format!("{token}A"),
            &format!("allotb2_{}", &token[PREFIX.len()..]),
            &token.replace('_', "/"),
        ] {
            assert_eq!(
                key.verify(bad, at(0)),
                Err(TokenError::Malformed),
                "{bad:?}"
            );
        }
    }

    proptest! {
        #[test]
        fn a_token_verifies_under_its_key_only_and_until_it_expires(
            session in any::<u128>(),
            user in 1..i64::MAX,
            expires in 1i64..4_000_000_000,
            now in 0i64..4_000_000_000,
            secret in proptest::collection::vec(any::<u8>(), 0..64),
            other in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let key = TokenKey::derive(&secret);
            let token = key.issue(&claims(session, user, expires));
            let verified = key.verify(&token, at(now));
            if now < expires {
                prop_assert_eq!(verified, Ok(claims(session, user, expires)));
            } else {
                prop_assert_eq!(verified, Err(TokenError::Expired));
            }
            if other != secret {
                prop_assert_eq!(
                    TokenKey::derive(&other).verify(&token, at(0)),
                    Err(TokenError::BadSignature)
                );
            }
        }

        #[test]
        fn changing_any_character_of_a_token_refuses_it(
            session in any::<u128>(),
            user in 1..i64::MAX,
            position in 0usize..TOKEN_LEN,
            replacement in proptest::sample::select(
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_+/=.".to_vec()
            ),
        ) {
            let key = TokenKey::derive(b"secret");
            let token = key.issue(&claims(session, user, 2_000_000_000));
            let mut altered = token.clone().into_bytes();
            prop_assume!(altered[position] != replacement);
            altered[position] = replacement;
            let altered = String::from_utf8(altered).unwrap();
            prop_assert!(key.verify(&altered, at(0)).is_err(), "{} accepted", altered);
        }
    }
}
