//! Sizes, durations and addresses as people type them (`10GiB`, `1.5GiB`, `30d`, `1h 30m`,
//! `localhost:8080`).

/// An address to listen on: `IP:PORT` (`127.0.0.1:8080`, `[::1]:8080`) or `HOST:PORT`
/// (`localhost:8080`), a host name resolved now, its first address taken.
pub fn parse_listen_addr(text: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs as _;
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!(
            "{text:?} is not HOST:PORT (e.g. 127.0.0.1:8080 or localhost:8080)"
        ));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!(
            "{text:?} is not HOST:PORT with a port up to 65535 (e.g. 127.0.0.1:8080)"
        ));
    }
    let mut addrs = text
        .to_socket_addrs()
        .map_err(|e| format!("{host:?} does not resolve: {e}"))?;
    addrs
        .next()
        .ok_or_else(|| format!("{host:?} resolves to no address"))
}

/// Parse a byte size: a number (whole or decimal) with an optional unit (`B`, `KB`, `MB`, `GB`, `TB`
/// decimal; `KiB`, `MiB`, `GiB`, `TiB` binary; case-insensitive, spaces allowed), e.g. `10GiB`, `1.5GiB`,
/// `512 MB`, `4096`. A fraction of a byte rounds down.
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let bad = || format!("{text:?} is not a size like 10GiB, 1.5GiB or 512MB");
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() || fraction.contains('.') || fraction.len() > 9 {
        return Err(bad());
    }
    let digits = format!("{whole}{fraction}");
    let mantissa: u128 = digits.parse().map_err(|_| bad())?;
    let factor: u128 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        "tib" | "t" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {text:?} (use B, KB, MB, GB, KiB, MiB, GiB …)"
            ));
        }
    };
    let scale = 10u128.pow(fraction.len() as u32);
    mantissa
        .checked_mul(factor)
        .map(|bytes| bytes / scale)
        .and_then(|bytes| u64::try_from(bytes).ok())
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Parse a duration like `30d`, `1h 30m`, `90s` (humantime).
pub fn parse_duration(text: &str) -> std::result::Result<std::time::Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration like 30d or 1h: {e}"))
}

#[cfg(test)]
mod tests {
    use super::parse_listen_addr;

    #[test]
    fn listen_addresses_take_ips_and_host_names_and_refuse_the_rest() {
        assert_eq!(
            parse_listen_addr("127.0.0.1:8080").unwrap().to_string(),
            "127.0.0.1:8080"
        );
        assert_eq!(parse_listen_addr("[::1]:9").unwrap().to_string(), "[::1]:9");
        let local = parse_listen_addr("localhost:8080").unwrap();
        assert!(local.ip().is_loopback() && local.port() == 8080, "{local}");
        for bad in [
            "localhost",
            ":80",
            "127.0.0.1:99999",
            "host:port",
            "",
            "nosuchhost.invalid:80",
        ] {
            assert!(parse_listen_addr(bad).is_err(), "{bad:?} was taken");
        }
    }
}
