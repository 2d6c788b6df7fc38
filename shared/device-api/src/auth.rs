//! Bearer-token authorization. Tokens are kept as SHA-256 hashes: the configuration (and a
//! Kubernetes Secret or ConfigMap rendered from it) never holds a usable token.

use sha2::{Digest, Sha256};

use crate::config::AuthConfig;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AuthDecision {
    /// With the name of the token that allowed it (none when auth is off).
    Allowed { token_name_opt: Option<String> },
    /// No token, or one that matches no configured hash: 401.
    Unauthenticated,
    /// A known token that may not write this stream: 403.
    Forbidden { token_name: String },
}

#[derive(Debug, Clone)]
struct TokenEntry {
    name: String,
    hash: [u8; 32],
    streams: Vec<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct Authorizer {
    enabled: bool,
    tokens: Vec<TokenEntry>,
}

impl Authorizer {
    /// Builds from validated configuration (hashes are 64 hex digits).
    pub(crate) fn new(config: &AuthConfig) -> Self {
        let tokens = config
            .tokens
            .iter()
            .filter_map(|token| {
                let mut hash = [0u8; 32];
                hex::decode_to_slice(token.token_sha256.expose(), &mut hash).ok()?;
                Some(TokenEntry { name: token.name.clone(), hash, streams: token.streams.clone() })
            })
            .collect();
        Self { enabled: config.enabled, tokens }
    }

    /// Decides for the value of an `Authorization` header.
    pub(crate) fn authorize(&self, authorization_opt: Option<&str>, stream: &str) -> AuthDecision {
        if !self.enabled {
            return AuthDecision::Allowed { token_name_opt: None };
        }
        let Some(token) = authorization_opt.and_then(|value| value.strip_prefix("Bearer ")).map(str::trim)
        else {
            return AuthDecision::Unauthenticated;
        };
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Compare against every entry without stopping early so timing does not tell which
        // prefix of which hash matched.
        let mut matched_opt = None;
        for entry in &self.tokens {
            let difference =
                entry.hash.iter().zip(presented.iter()).fold(0u8, |acc, (left, right)| acc | (left ^ right));
            if difference == 0 {
                matched_opt = Some(entry);
            }
        }
        match matched_opt {
            None => AuthDecision::Unauthenticated,
            Some(entry) if may_write(&entry.streams, stream) => {
                AuthDecision::Allowed { token_name_opt: Some(entry.name.clone()) }
            }
            Some(entry) => AuthDecision::Forbidden { token_name: entry.name.clone() },
        }
    }
}

/// Whether a list of writable streams (a token's, or `http.tls_client_streams`) names `stream`,
/// or is `"*"`.
pub(crate) fn may_write(streams: &[String], stream: &str) -> bool {
    streams.iter().any(|allowed| allowed == "*" || allowed == stream)
}

#[cfg(test)]
mod tests {
    use sluice_config::Secret;

    use super::*;
    use crate::config::TokenConfig;

    fn sha256_hex(token: &str) -> String {
        hex::encode(Sha256::digest(token.as_bytes()))
    }

    fn authorizer() -> Authorizer {
        Authorizer::new(&AuthConfig {
            enabled: true,
            tokens: vec![
                TokenConfig {
                    name: "farm".into(),
                    token_sha256: Secret::new(sha256_hex("farm-token")),
                    streams: vec!["telemetry".into()],
                },
                TokenConfig {
                    name: "admin".into(),
                    token_sha256: Secret::new(sha256_hex("admin-token")),
                    streams: vec!["*".into()],
                },
            ],
        })
    }

    #[test]
    fn tokens_are_checked_per_stream() {
        let authorizer = authorizer();
        assert_eq!(
            authorizer.authorize(Some("Bearer farm-token"), "telemetry"),
            AuthDecision::Allowed { token_name_opt: Some("farm".into()) }
        );
        assert_eq!(
            authorizer.authorize(Some("Bearer farm-token"), "alarms"),
            AuthDecision::Forbidden { token_name: "farm".into() }
        );
        assert_eq!(
            authorizer.authorize(Some("Bearer admin-token"), "alarms"),
            AuthDecision::Allowed { token_name_opt: Some("admin".into()) }
        );
    }

    #[test]
    fn missing_or_unknown_tokens_are_unauthenticated() {
        let authorizer = authorizer();
        assert_eq!(authorizer.authorize(None, "telemetry"), AuthDecision::Unauthenticated);
        assert_eq!(authorizer.authorize(Some("Bearer nope"), "telemetry"), AuthDecision::Unauthenticated);
        assert_eq!(authorizer.authorize(Some("Basic ZmFybQ=="), "telemetry"), AuthDecision::Unauthenticated);
    }

    #[test]
    fn disabled_auth_allows_everything() {
        let authorizer = Authorizer::new(&AuthConfig { enabled: false, tokens: Vec::new() });
        assert_eq!(authorizer.authorize(None, "telemetry"), AuthDecision::Allowed { token_name_opt: None });
    }
}
