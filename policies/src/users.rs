//! Principals and the local users file (Argon2 password hashes, never plain text).

use std::collections::BTreeMap;

use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::Argon2;
use serde::{Deserialize, Serialize};

use crate::{PolicyError, Result};

/// An authenticated caller and the attributes the identity source gave it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub attributes: BTreeMap<String, String>,
}

impl Principal {
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    name: String,
    /// PHC string, `$argon2id$...`. Absent for users who sign in only with a client
    /// certificate or a JWT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    password_hash: Option<String>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
    #[serde(default)]
    disabled: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    #[serde(default, rename = "user")]
    users: Vec<UserEntry>,
}

/// The local user directory for Basic authentication.
#[derive(Clone, Debug, Default)]
pub struct UserStore {
    users: BTreeMap<String, UserEntry>,
}

impl UserStore {
    /// Parse a users file (TOML, `[[user]]` tables with `name`, `password_hash`, `attributes`).
    pub fn from_toml(file: &str, text: &str) -> Result<Self> {
        let invalid = |reason: String| PolicyError::InvalidFile {
            file: file.to_string(),
            reason,
        };
        let parsed: UsersFile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let mut users = BTreeMap::new();
        for u in parsed.users {
            if u.name.is_empty() {
                return Err(invalid("a user has an empty name".into()));
            }
            let Some(hash) = &u.password_hash else {
                if users.insert(u.name.clone(), u.clone()).is_some() {
                    return Err(invalid(format!("user '{}' is listed twice", u.name)));
                }
                continue;
            };
            PasswordHash::new(hash).map_err(|e| {
                invalid(format!(
                    "user '{}': password_hash is not a PHC string: {e}",
                    u.name
                ))
            })?;
            if users.contains_key(&u.name) {
                return Err(invalid(format!("user '{}' is listed twice", u.name)));
            }
            users.insert(u.name.clone(), u);
        }
        Ok(Self { users })
    }

    /// Add a user, hashing the password with Argon2id.
    pub fn add(
        &mut self,
        name: &str,
        password: &str,
        attributes: BTreeMap<String, String>,
    ) -> Result<()> {
        let salt = SaltString::generate(&mut OsRng);
        let hash = Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map_err(|e| PolicyError::Hash(e.to_string()))?
            .to_string();
        self.users.insert(
            name.to_string(),
            UserEntry {
                name: name.to_string(),
                password_hash: Some(hash),
                attributes,
                disabled: false,
            },
        );
        Ok(())
    }

    /// Serialize to the users-file format.
    pub fn to_toml(&self) -> String {
        let file = UsersFile {
            users: self.users.values().cloned().collect(),
        };
        toml::to_string(&file).unwrap_or_default()
    }

    /// Check a name and password. Unknown users and wrong passwords give the same error, and
    /// both do the work of one hash verification so timing does not tell them apart.
    pub fn authenticate(&self, name: &str, password: &str) -> Result<Principal> {
        const DUMMY: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$Yk2hQAxw8WNs6hU0d2YJtYpHTDqN1G3GrDJt3f+T4vQ";
        let entry = self.users.get(name).filter(|u| !u.disabled);
        let hash = entry
            .and_then(|u| u.password_hash.as_deref())
            .unwrap_or(DUMMY);
        let entry = entry.filter(|u| u.password_hash.is_some());
        let ok = PasswordHash::new(hash)
            .map(|h| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &h)
                    .is_ok()
            })
            .unwrap_or(false);
        match entry {
            Some(u) if ok => Ok(Principal {
                name: u.name.clone(),
                attributes: u.attributes.clone(),
            }),
            _ => Err(PolicyError::BadCredentials),
        }
    }

    /// Whether the file lists `name` as disabled: revoked, whatever credential it presents.
    pub fn is_disabled(&self, name: &str) -> bool {
        self.users.get(name).is_some_and(|u| u.disabled)
    }

    /// The current principal for a name, if the user still exists and is enabled. Used on
    /// every RPC so that removing or changing a user takes effect on their next call.
    pub fn principal(&self, name: &str) -> Option<Principal> {
        self.users
            .get(name)
            .filter(|u| !u.disabled)
            .map(|u| Principal {
                name: u.name.clone(),
                attributes: u.attributes.clone(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hashed_and_checked() {
        let mut s = UserStore::default();
        s.add(
            "alice",
            "demo-alice",
            [("role".to_string(), "x".to_string())].into(),
        )
        .unwrap();
        assert!(!s.to_toml().contains("demo-alice"));
        assert!(s.to_toml().contains("$argon2id$"));
        assert_eq!(
            s.authenticate("alice", "demo-alice")
                .unwrap()
                .attribute("role"),
            Some("x")
        );
        assert!(matches!(
            s.authenticate("alice", "wrong"),
            Err(PolicyError::BadCredentials)
        ));
        assert!(matches!(
            s.authenticate("nobody", "demo-alice"),
            Err(PolicyError::BadCredentials)
        ));
        let reloaded = UserStore::from_toml("users.toml", &s.to_toml()).unwrap();
        assert!(reloaded.authenticate("alice", "demo-alice").is_ok());
    }

    #[test]
    fn plain_password_in_file_is_refused() {
        let err = UserStore::from_toml(
            "users.toml",
            "[[user]]\nname='a'\npassword_hash='hunter2'\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("users.toml: user 'a': password_hash is not a PHC string"),
            "{err}"
        );
    }
}
