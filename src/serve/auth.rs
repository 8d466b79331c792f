//! Who may read and write: bearer tokens, read-only or read-write, compared by their SHA-256 so a
//! comparison takes the same time whatever the guess, and never kept or logged in the clear.

use std::sync::{Arc, RwLock, RwLockReadGuard};

use axum::http::{HeaderMap, header};
use base64::Engine as _;
use sha2::{Digest, Sha256};

/// What a request's credentials allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// No credentials.
    Anonymous,
    /// A read-only token.
    ReadOnly,
    /// A read-write token.
    ReadWrite,
    /// Credentials that match no token.
    Denied,
}

/// The configured tokens (their digests). Clones share one set, so the tokens of a running server
/// can be replaced at once ([`Tokens::replace_with`], what `outcache serve` does on SIGHUP).
#[derive(Clone, Default)]
pub struct Tokens {
    set: Arc<RwLock<TokenSet>>,
}

#[derive(Clone, Default)]
struct TokenSet {
    read_write: Vec<[u8; 32]>,
    read_only: Vec<[u8; 32]>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = self.read();
        write!(
            f,
            "Tokens {{ {} read-write, {} read-only }}",
            set.read_write.len(),
            set.read_only.len()
        )
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Tokens {
    /// Parse a tokens file: one token per line, `rw TOKEN` or `ro TOKEN`; blank lines and `#` comments
    /// are skipped. Errors name the line number, never its text. Refused, since no request could use
    /// it as meant: a token with spaces in it (a comment left on its line), one that is not visible
    /// ASCII (it travels in an HTTP header, where no client can send it), and one listed both `rw` and
    /// `ro` (which access it gets would be a guess).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut tokens = Tokens::default();
        let mut first_seen: std::collections::HashMap<[u8; 32], (usize, &str)> =
            std::collections::HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let (n, line) = (i + 1, line.trim());
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (access, token) = match line.split_once(char::is_whitespace) {
                Some((access @ ("rw" | "ro"), t)) if !t.trim().is_empty() => (access, t.trim()),
                _ => return Err(format!("line {n}: expected `rw TOKEN` or `ro TOKEN`")),
            };
            if token.contains(char::is_whitespace) {
                return Err(format!(
                    "line {n}: a token is one word, without spaces (comments go on lines of their \
                     own, starting with #)"
                ));
            }
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!(
                    "line {n}: a token must be visible ASCII (it is sent in an HTTP header)"
                ));
            }
            let d = digest(token);
            match first_seen.get(&d) {
                Some(&(m, before)) if before != access => {
                    return Err(format!(
                        "line {n}: the same token is listed as `{before}` on line {m}; list it once"
                    ));
                }
                Some(_) => continue,
                None => first_seen.insert(d, (n, access)),
            };
            if access == "rw" {
                tokens.add_read_write(token);
            } else {
                tokens.add_read_only(token);
            }
        }
        Ok(tokens)
    }

    /// How many tokens of each kind, for the server's log: `tokens: 1 read-write, 2 read-only`.
    pub fn describe(&self) -> String {
        let set = self.read();
        let (rw, ro) = (set.read_write.len(), set.read_only.len());
        let noun = if rw + ro == 1 { "token" } else { "tokens" };
        format!("{noun}: {rw} read-write, {ro} read-only")
    }

    /// Accept `token` for reads and writes.
    pub fn add_read_write(&mut self, token: &str) {
        self.write().read_write.push(digest(token));
    }

    /// Accept `token` for reads.
    pub fn add_read_only(&mut self, token: &str) {
        self.write().read_only.push(digest(token));
    }

    /// True if no token is configured.
    pub fn is_empty(&self) -> bool {
        let set = self.read();
        set.read_write.is_empty() && set.read_only.is_empty()
    }

    /// From now on accept `other`'s tokens instead of these, here and in every clone (the running
    /// server's): requests already let in go on, the next ones are checked against the new set.
    pub fn replace_with(&self, other: &Tokens) {
        let new = other.read().clone();
        *self.write() = new;
    }

    fn read(&self) -> RwLockReadGuard<'_, TokenSet> {
        self.set.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, TokenSet> {
        self.set.write().unwrap_or_else(|p| p.into_inner())
    }

    /// What the request's `Authorization` header allows: `Bearer TOKEN`, or `Basic` with the token as
    /// the password (the user is ignored), which is how ccache sends `http://user:TOKEN@host/`.
    pub fn access(&self, headers: &HeaderMap) -> Access {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Access::Anonymous;
        };
        // Credentials that are not even text match no token: refused as any wrong token is, not
        // served as if none were sent.
        let Ok(value) = value.to_str() else {
            return Access::Denied;
        };
        // The scheme is case-insensitive (RFC 9110 §11.1): some clients send `bearer`.
        let (scheme, credentials) = value.split_once(' ').unwrap_or((value, ""));
        let token = if scheme.eq_ignore_ascii_case("bearer") {
            credentials.trim().to_owned()
        } else if scheme.eq_ignore_ascii_case("basic") {
            let b = credentials;
            let Some(pair) = base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
                .and_then(|d| String::from_utf8(d).ok())
            else {
                return Access::Denied;
            };
            match pair.split_once(':') {
                Some((_, password)) => password.to_owned(),
                None => return Access::Denied,
            }
        } else {
            return Access::Denied;
        };
        let d = digest(&token);
        let set = self.read();
        if set.read_write.contains(&d) {
            Access::ReadWrite
        } else if set.read_only.contains(&d) {
            Access::ReadOnly
        } else {
            Access::Denied
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(authorization: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, authorization.parse().unwrap());
        headers
    }

    #[test]
    fn a_replaced_set_holds_in_every_clone_at_once() {
        let tokens = Tokens::parse("rw old\n").unwrap();
        let serving = tokens.clone();
        assert_eq!(serving.access(&with("Bearer old")), Access::ReadWrite);
        tokens.replace_with(&Tokens::parse("ro new\n").unwrap());
        assert_eq!(serving.access(&with("Bearer old")), Access::Denied);
        assert_eq!(serving.access(&with("Bearer new")), Access::ReadOnly);
        assert_eq!(
            format!("{serving:?}"),
            "Tokens { 0 read-write, 1 read-only }"
        );
    }

    #[test]
    fn a_tokens_file_no_request_could_use_as_meant_is_refused_by_line() {
        for (text, line, why) in [
            ("rw good\nrw abc # ci token\n", "line 2", "one word"),
            ("ro caf\u{e9}\n", "line 1", "visible ASCII"),
            ("rw one\n\nro one\n", "line 3", "listed as `rw` on line 1"),
            ("rw one\nxx two\n", "line 2", "expected `rw TOKEN`"),
        ] {
            let err = Tokens::parse(text).unwrap_err();
            assert!(
                err.starts_with(line) && err.contains(why),
                "{text:?}: {err}"
            );
            assert!(!err.contains("one\n") && !err.contains("caf"), "{err}");
        }
        let repeated = Tokens::parse("rw one\nrw one\nro two\n").unwrap();
        assert_eq!(repeated.describe(), "tokens: 1 read-write, 1 read-only");
        assert_eq!(
            Tokens::parse("ro x\n").unwrap().describe(),
            "token: 0 read-write, 1 read-only"
        );
    }

    #[test]
    fn schemes_are_case_insensitive_and_tokens_exact() {
        let tokens = Tokens::parse("rw secret\nro reader\n").unwrap();
        let basic = base64::engine::general_purpose::STANDARD.encode("user:secret");
        for (header, access) in [
            ("Bearer secret", Access::ReadWrite),
            ("bearer secret", Access::ReadWrite),
            ("BEARER  reader ", Access::ReadOnly),
            (&*format!("Basic {basic}"), Access::ReadWrite),
            (&*format!("basic {basic}"), Access::ReadWrite),
            ("Bearer Secret", Access::Denied),
            ("Bearer", Access::Denied),
            ("Token secret", Access::Denied),
            ("Basic !!!", Access::Denied),
        ] {
            assert_eq!(tokens.access(&with(header)), access, "{header}");
        }
        assert_eq!(tokens.access(&HeaderMap::new()), Access::Anonymous);
        let mut not_text = HeaderMap::new();
        not_text.insert(
            header::AUTHORIZATION,
            axum::http::HeaderValue::from_bytes(b"Bearer \xffsecret").unwrap(),
        );
        assert_eq!(tokens.access(&not_text), Access::Denied);
    }
}
