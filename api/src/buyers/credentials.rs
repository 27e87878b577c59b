//! Usernames and passwords: the rules they must meet (pure), and Argon2id hashing.
//!
//! Rules, checked before anything is hashed or written:
//! - a username has 3 to 32 characters: ASCII letters, digits, `.`, `_` and `-`, beginning with
//!   a letter or a digit. It is case-insensitive: stored and shown in lower case.
//! - a password has 8 to 128 characters (Unicode), any but control characters, spaces
//!   included, and is not the username. It is used exactly as sent (no trimming, no
//!   normalisation). No composition rules (NIST SP 800-63B).
//!
//! Hashing is Argon2id with the `argon2` crate's defaults (19 MiB, 2 passes, 1 lane: OWASP's
//! recommendation), a fresh random salt per password, stored as a PHC string that carries its
//! own parameters, so they can be raised later without invalidating older hashes. Hashing is
//! CPU- and memory-heavy on purpose: it runs on the blocking pool, at most one per core at a
//! time, so that logins cannot starve the purchase path of its threads.

use anyhow::Context;
use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use serde::Deserialize;
use std::sync::{Arc, OnceLock};
use tokio::sync::Semaphore;

pub const USERNAME_MIN: usize = 3;
pub const USERNAME_MAX: usize = 32;
pub const PASSWORD_MIN: usize = 8;
pub const PASSWORD_MAX: usize = 128;
/// The username rule as a regular expression (OpenAPI `pattern`; the database checks the same
/// in lower case).
pub const USERNAME_PATTERN: &str = r"^[A-Za-z0-9][A-Za-z0-9._-]{2,31}$";

/// A valid username, folded to lower case.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Username(String);

impl Username {
    /// Checks the rule; the error says which part failed.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let length = raw.chars().count();
        if !(USERNAME_MIN..=USERNAME_MAX).contains(&length) {
            return Err(format!(
                "username must have {USERNAME_MIN} to {USERNAME_MAX} characters, got {length}"
            ));
        }
        if !raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err("username may only contain ASCII letters, digits, '.', '_' and '-'".into());
        }
        if !raw.as_bytes()[0].is_ascii_alphanumeric() {
            return Err("username must begin with a letter or a digit".into());
        }
        Ok(Self(raw.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A password as the client sent it. Its `Debug` never shows it, so it cannot reach a log by
/// accident.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Password(String);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(..)")
    }
}

impl Password {
    /// Checks the rule for a new password of `username`.
    pub fn check_new(&self, username: &Username) -> Result<(), String> {
        let length = self.0.chars().count();
        if !(PASSWORD_MIN..=PASSWORD_MAX).contains(&length) {
            return Err(format!(
                "password must have {PASSWORD_MIN} to {PASSWORD_MAX} characters, got {length}"
            ));
        }
        if self.0.chars().any(char::is_control) {
            return Err("password may not contain control characters".into());
        }
        if self.0.eq_ignore_ascii_case(username.as_str()) {
            return Err("password may not be the username".into());
        }
        Ok(())
    }

    /// Whether it could be anybody's password: a login with one that could not is refused
    /// without hashing anything (no stored password breaks the rule, whatever the username).
    pub fn could_be_valid(&self) -> bool {
        let length = self.0.chars().count();
        (PASSWORD_MIN..=PASSWORD_MAX).contains(&length) && !self.0.chars().any(char::is_control)
    }

    #[cfg(test)]
    pub fn from_plain(plain: &str) -> Self {
        Self(plain.to_owned())
    }
}

/// Hashes and verifies passwords on the blocking pool, a bounded number at a time.
#[derive(Clone)]
pub struct Hasher {
    permits: Arc<Semaphore>,
}

impl Default for Hasher {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        Self {
            permits: Arc::new(Semaphore::new(cores)),
        }
    }
}

impl Hasher {
    /// The PHC string of `password` (Argon2id, fresh salt).
    pub async fn hash(&self, password: Password) -> anyhow::Result<String> {
        self.blocking(move || {
            Argon2::default()
                .hash_password(password.0.as_bytes())
                .map(|hash| hash.to_string())
                .map_err(|err| anyhow::anyhow!("argon2 failed: {err}"))
        })
        .await
    }

    /// Whether `password` matches `stored` (a PHC string). With no stored hash (an unknown
    /// username) a hash is verified all the same, so that the answer takes as long either way
    /// and does not tell which usernames exist. The comparison is the crate's, constant-time.
    pub async fn verify(&self, password: Password, stored: Option<String>) -> anyhow::Result<bool> {
        self.blocking(move || {
            let known = stored.is_some();
            let stored = stored.unwrap_or_else(|| dummy_hash().to_owned());
            let hash = PasswordHash::new(&stored)
                .map_err(|err| anyhow::anyhow!("a stored password hash is unreadable: {err}"))?;
            let matches = Argon2::default()
                .verify_password(password.0.as_bytes(), &hash)
                .is_ok();
            Ok(known && matches)
        })
        .await
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let _permit = self
            .permits
            .acquire()
            .await
            .context("the password hasher is closed")?;
        tokio::task::spawn_blocking(work)
            .await
            .context("password hashing panicked")?
    }
}

/// The hash an unknown username's login is checked against: of a random password nobody
/// knows, made once per process.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        let nobody = uuid::Uuid::new_v4().to_string();
        Argon2::default()
            .hash_password(nobody.as_bytes())
            .expect("argon2 hashes a short password")
            .to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn usernames_follow_the_rule_and_fold_to_lower_case() {
        assert_eq!(
            Username::parse("Alice.B-2_").unwrap().as_str(),
            "alice.b-2_"
        );
        assert_eq!(Username::parse("abc").unwrap().as_str(), "abc");
        assert_eq!(
            Username::parse(&"a".repeat(32)).unwrap().as_str(),
            "a".repeat(32)
        );
        for bad in [
            "ab",
            "",
            &"a".repeat(33),
            "_abc",
            ".abc",
            "-abc",
            "al ice",
            "alïce",
            "a@b.c",
            "abc\n",
        ] {
            assert!(Username::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn passwords_follow_the_rule() {
        let alice = Username::parse("alice").unwrap();
        for good in [
            "correct horse",
            "        ",
            "pässwörd",
            &"x".repeat(128),
            "ALICE123",
        ] {
            assert_eq!(
                Password::from_plain(good).check_new(&alice),
                Ok(()),
                "{good:?}"
            );
        }
        for bad in [
            "short",
            &"x".repeat(129),
            "pass\tword",
            "pass\u{0}word",
            "password\n",
        ] {
            assert!(
                Password::from_plain(bad).check_new(&alice).is_err(),
                "{bad:?}"
            );
        }
        let named = Username::parse("longusername").unwrap();
        assert!(
            Password::from_plain("LongUserName")
                .check_new(&named)
                .is_err()
        );
        assert_eq!(
            format!("{:?}", Password::from_plain("hunter22")),
            "Password(..)"
        );
    }

    proptest! {
        #[test]
        fn a_username_matches_the_documented_pattern_exactly_when_it_parses(raw in "[ -~]{0,40}") {
            // The pattern, spelt out without a regex engine.
            let bytes = raw.as_bytes();
            let allowed = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
            let matches = (3..=32).contains(&bytes.len())
                && bytes[0].is_ascii_alphanumeric()
                && bytes.iter().all(allowed);
            prop_assert_eq!(Username::parse(&raw).is_ok(), matches);
        }
    }

    #[tokio::test]
    async fn a_hash_verifies_its_password_only() {
        let hasher = Hasher::default();
        let stored = hasher
            .hash(Password::from_plain("correct horse"))
            .await
            .unwrap();
        assert!(
            stored.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{stored}"
        );
        assert!(!stored.contains("correct horse"));
        let check = |plain: &str, stored: Option<String>| {
            hasher.verify(Password::from_plain(plain), stored)
        };
        assert!(check("correct horse", Some(stored.clone())).await.unwrap());
        assert!(!check("correct horsE", Some(stored.clone())).await.unwrap());
        assert!(
            !check("correct horse", None).await.unwrap(),
            "an unknown user never logs in"
        );
        let again = hasher
            .hash(Password::from_plain("correct horse"))
            .await
            .unwrap();
        assert_ne!(stored, again, "a fresh salt each time");
    }
}
