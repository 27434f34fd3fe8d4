//! The units settings are written in: durations (`500ms`, `25s`, `10m`,
//! `1h`, or bare seconds) and sizes (`512`, `64KiB`, `1MiB`, `1GiB`). Each
//! reads from a flag, an environment variable or TOML (a bare number, or a
//! string with a unit) and prints back in the form it reads, which is how
//! `--help` shows a default. Bounds that depend on the setting are
//! [`super::Config`]'s to check; the one bound every duration has is
//! [`MAX_DURATION`]. Address ranges (`10.0.0.0/8`, `2001:db8::/32`, or a
//! bare address) are [`Cidr`].

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

/// Longest duration any setting accepts. Shards turn durations into u64
/// millisecond deadlines (`now + 2 * heartbeat`); a year is far past any
/// sensible value and far from overflowing them.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// A duration written as `500ms`, `25s`, `10m`, `1h`, or bare seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

/// A size written as `512`, `64KiB`, `1MiB`, `1GiB` (also `KB`/`MB`/`GB`/`k`/`m`, all powers of 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub usize);

/// Why a setting's value could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValueError(String);

fn split_unit(s: &str) -> (&str, &str) {
    let at = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    (&s[..at], s[at..].trim())
}

impl FromStr for HumanDuration {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (num, unit) = split_unit(s.trim());
        let n: u64 = num.parse().map_err(|_| {
            ValueError(format!(
                "{s:?} is not a duration (e.g. 500ms, 25s, 10m, 1h)"
            ))
        })?;
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "" | "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            _ => {
                return Err(ValueError(format!(
                    "{s:?}: unknown unit {unit:?} (use ms, s, m or h)"
                )))
            }
        };
        Ok(HumanDuration(d))
    }
}

impl FromStr for ByteSize {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (num, unit) = split_unit(s.trim());
        let n: usize = num
            .parse()
            .map_err(|_| ValueError(format!("{s:?} is not a size (e.g. 65536, 64KiB, 1MiB)")))?;
        let mult: usize = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            _ => {
                return Err(ValueError(format!(
                    "{s:?}: unknown unit {unit:?} (use KiB, MiB or GiB)"
                )))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| ValueError(format!("{s:?} is too large")))
    }
}

/// The largest unit that divides the duration exactly: `25s`, `10m`, `1h`,
/// `500ms` (`0s` for zero). Reads back as the same duration.
impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (secs, nanos) = (self.0.as_secs(), self.0.subsec_nanos());
        match secs {
            _ if nanos != 0 => write!(f, "{}ms", self.0.as_millis()),
            0 => write!(f, "0s"),
            s if s.is_multiple_of(3600) => write!(f, "{}h", s / 3600),
            s if s.is_multiple_of(60) => write!(f, "{}m", s / 60),
            s => write!(f, "{s}s"),
        }
    }
}

/// The largest unit that divides the size exactly: `64KiB`, `1MiB`, `1GiB`,
/// or bare bytes. Reads back as the same size.
impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        let unit = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")]
            .into_iter()
            .find(|(size, _)| n != 0 && n.is_multiple_of(*size));
        match unit {
            Some((size, name)) => write!(f, "{}{name}", n / size),
            None => write!(f, "{n}"),
        }
    }
}

impl From<HumanDuration> for Duration {
    fn from(d: HumanDuration) -> Duration {
        d.0
    }
}

impl From<ByteSize> for usize {
    fn from(b: ByteSize) -> usize {
        b.0
    }
}

/// An address range, `10.0.0.0/8` or `2001:db8::/32`; a bare address is
/// the range of that one address. Host bits past the prefix are refused
/// (`10.0.0.1/8` is a typo for either `10.0.0.1` or `10.0.0.0/8`, and in a
/// list of trusted proxies the difference matters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in the range. An IPv4-mapped IPv6 address
    /// (`::ffff:10.1.2.3`, as a dual-stack listener reports IPv4 peers) is
    /// its IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                mask(u32::from(ip) as u128, 32, self.prefix) == u32::from(net) as u128
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask(u128::from(ip), 128, self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }
}

/// `bits` with only the first `prefix` of its `width` bits kept.
fn mask(bits: u128, width: u8, prefix: u8) -> u128 {
    let drop = width - prefix;
    if drop >= 128 {
        0
    } else {
        bits >> drop << drop
    }
}

impl FromStr for Cidr {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| {
            ValueError(format!(
                "{s:?} is not an address range (e.g. 10.0.0.0/8, 2001:db8::/32, 192.0.2.7)"
            ))
        })?;
        let addr = addr.to_canonical();
        let width = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => width,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= width => n,
                _ => {
                    return Err(ValueError(format!(
                        "{s:?}: prefix length {p:?} is not 0-{width}"
                    )))
                }
            },
        };
        let bits = match addr {
            IpAddr::V4(a) => u32::from(a) as u128,
            IpAddr::V6(a) => u128::from(a),
        };
        if mask(bits, width, prefix) != bits {
            return Err(ValueError(format!(
                "{s:?} has bits set past its /{prefix} prefix (did you mean {}/{prefix}, or the one address {addr}?)",
                match addr {
                    IpAddr::V4(_) => IpAddr::from(std::net::Ipv4Addr::from(mask(bits, 32, prefix) as u32)),
                    IpAddr::V6(_) => IpAddr::from(std::net::Ipv6Addr::from(mask(bits, 128, prefix))),
                }
            )));
        }
        Ok(Cidr { addr, prefix })
    }
}

/// `10.0.0.0/8`; reads back as the same range.
impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Reads a number (seconds or bytes) or a string with a unit from TOML.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrStr {
    Num(u64),
    Str(String),
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match NumOrStr::deserialize(d)? {
            NumOrStr::Num(n) => Ok(HumanDuration(Duration::from_secs(n))),
            NumOrStr::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match NumOrStr::deserialize(d)? {
            NumOrStr::Num(n) => usize::try_from(n)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
            NumOrStr::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_parse_with_units() {
        assert_eq!(
            "25s".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(25)
        );
        assert_eq!(
            "25".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(25)
        );
        assert_eq!(
            "500ms".parse::<HumanDuration>().unwrap().0,
            Duration::from_millis(500)
        );
        assert_eq!(
            "10m".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(600)
        );
        assert_eq!("64KiB".parse::<ByteSize>().unwrap().0, 65536);
        assert_eq!("1MiB".parse::<ByteSize>().unwrap().0, 1 << 20);
        assert!("10x"
            .parse::<HumanDuration>()
            .unwrap_err()
            .0
            .contains("unknown unit"));
        assert!("".parse::<HumanDuration>().is_err());
        assert!("-1s".parse::<HumanDuration>().is_err());
        assert!("99999999999999999999GiB".parse::<ByteSize>().is_err());
        assert!("18446744073709551615GiB"
            .parse::<ByteSize>()
            .unwrap_err()
            .0
            .contains("too large"));
    }

    #[test]
    fn durations_and_sizes_print_as_they_are_read() {
        for text in [
            "0s", "500ms", "1500ms", "25s", "90s", "10m", "61m", "1h", "8760h",
        ] {
            let d: HumanDuration = text.parse().unwrap();
            assert_eq!(d.to_string(), text);
        }
        for text in [
            "0", "512", "1025", "8KiB", "64KiB", "1536KiB", "1MiB", "64MiB", "1GiB",
        ] {
            let b: ByteSize = text.parse().unwrap();
            assert_eq!(b.to_string(), text);
        }
    }

    #[test]
    fn address_ranges() {
        let r = |s: &str| s.parse::<Cidr>();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let net = r("10.0.0.0/8").unwrap();
        assert!(net.contains(ip("10.255.0.1")));
        assert!(
            net.contains(ip("::ffff:10.1.2.3")),
            "IPv4-mapped peers match"
        );
        assert!(!net.contains(ip("11.0.0.1")));
        assert!(
            !net.contains(ip("::a00:1")),
            "an IPv6 address is not in an IPv4 range"
        );
        let one = r("192.0.2.7").unwrap();
        assert!(one.contains(ip("192.0.2.7")) && !one.contains(ip("192.0.2.8")));
        assert_eq!(one.to_string(), "192.0.2.7/32");
        let v6 = r("2001:db8::/32").unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")) && !v6.contains(ip("2001:db9::1")));
        let all = r("0.0.0.0/0").unwrap();
        assert!(all.contains(ip("203.0.113.1")));
        assert!(r("::/0").unwrap().contains(ip("2001:db8::1")));
        assert_eq!(r(" 127.0.0.0/8 ").unwrap().to_string(), "127.0.0.0/8");
        for (bad, why) in [
            ("10.0.0.1/8", "did you mean 10.0.0.0/8"),
            ("10.0.0.0/33", "prefix length \"33\" is not 0-32"),
            ("2001:db8::/129", "is not 0-128"),
            ("10.0.0.0/x", "prefix length \"x\""),
            ("localhost", "is not an address range"),
            ("", "is not an address range"),
        ] {
            let err = r(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
