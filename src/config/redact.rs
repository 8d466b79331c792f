//! The redaction rule: which option values may ever be printed (an allow-list), and how URLs and
//! client error messages are scrubbed of credentials.

/// What a redacted value prints as.
pub const REDACTED: &str = "<redacted>";

/// **The redaction rule**: a value is printed only if its key is on this allow-list of options known to
/// hold no secret (region, bucket, endpoint, timeouts, sizes, flags); every other value — credentials,
/// SSE-C keys, proxy URLs, anything unknown or misspelt — prints as [`REDACTED`]. Errors name keys, never
/// values. The check is on the percent-decoded, lowercased key with object_store's `aws_`, `azure_` or
/// `google_` prefix removed.
pub fn is_public_option(key: &str) -> bool {
    const PUBLIC: &[&str] = &[
        "region",
        "default_region",
        "bucket",
        "bucket_name",
        "endpoint",
        "endpoint_url",
        "allow_http",
        "allow_invalid_certificates",
        "virtual_hosted_style_request",
        "skip_signature",
        "unsigned_payload",
        "checksum_algorithm",
        "s3_express",
        "request_payer",
        "conditional_put",
        "disable_tagging",
        "imdsv1_fallback",
        "timeout",
        "connect_timeout",
        "max_retries",
        "retry_timeout",
        "durable",
        // Azure and GCS names that hold no secret (`azure_`/`google_` prefixes are optional too).
        "account_name",
        "storage_account_name",
        "container_name",
        "use_emulator",
        "use_fabric_endpoint",
        "disable_tagging",
    ];
    let decoded = percent_decode(key).to_ascii_lowercase();
    let bare = ["aws_", "azure_storage_", "azure_", "google_"]
        .iter()
        .find_map(|p| decoded.strip_prefix(p))
        .unwrap_or(&decoded);
    PUBLIC.contains(&bare)
}

/// Whether an option key's value must never be shown: everything not on the allow-list
/// ([`is_public_option`]).
pub fn is_secret_key(key: &str) -> bool {
    !is_public_option(key)
}

fn percent_decode(text: &str) -> String {
    url::form_urlencoded::parse(format!("k={text}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| text.to_owned())
}

/// How a public option's value prints: an endpoint without its userinfo (a password or token may sit
/// there) or query; anything else as it is.
pub(super) fn public_value(key: &str, value: &str) -> String {
    let decoded = percent_decode(key).to_ascii_lowercase();
    if decoded.contains("endpoint") {
        return strip_userinfo_and_query(value);
    }
    value.to_owned()
}

fn strip_userinfo_and_query(url: &str) -> String {
    let url = url.split(['?', '#']).next().unwrap_or(url);
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority
                .rsplit_once('@')
                .map_or(authority, |(_, host)| host);
            let hidden = if authority.contains('@') {
                format!("{REDACTED}@")
            } else {
                String::new()
            };
            format!("{scheme}://{hidden}{host}{path}")
        }
        None => url.to_owned(),
    }
}

/// `text` (an error message from a client library) with every URL in it passed through [`redact_url`]:
/// userinfo and non-public query values become [`REDACTED`].
pub fn scrub_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        // The URL starts at the scheme before `://` and ends at whitespace or a quote.
        let start = rest[..at]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || "+.-".contains(c)))
            .map_or(0, |i| i + 1);
        let end = rest[at..]
            .find(|c: char| c.is_whitespace() || "\"'<>`".contains(c))
            .map_or(rest.len(), |i| at + i);
        out.push_str(&rest[..start]);
        out.push_str(&redact_url(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// `url` for messages and logs: any userinfo (`user:password@`, a bare `TOKEN@`) replaced by
/// [`REDACTED`], and the value of every query option not on the allow-list ([`is_public_option`]) too.
pub fn redact_url(url: &str) -> String {
    let url = url.trim();
    // Options pasted with the wrong separator (`s3://b/p&secret_access_key=…`, or an unset variable
    // in front of `&secret_access_key=…`) are options all the same where secrets are concerned: with
    // no `?`, the first `&` starts them, and text that is no URL at all but holds a `=` is all options.
    let starts_options = url.find('?').or_else(|| url.find('&'));
    let (base, separator, query) = match starts_options {
        Some(at) => (&url[..at], &url[at..=at], Some(&url[at + 1..])),
        None if !url.contains("://") && url.contains('=') => ("", "", Some(url)),
        None => (url, "", None),
    };
    let base = base.split('#').next().unwrap_or(base);
    let base = match base.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            match authority.rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://{REDACTED}@{host}{path}"),
                None => base.to_owned(),
            }
        }
        None => base.to_owned(),
    };
    let Some(query) = query else {
        return base;
    };
    let query = query.split('#').next().unwrap_or(query);
    let pairs: Vec<String> = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if is_public_option(key) {
                format!("{key}={}", public_value(key, &percent_decode(value)))
            } else {
                format!("{key}={REDACTED}")
            }
        })
        .collect();
    format!("{base}{separator}{}", pairs.join("&"))
}
