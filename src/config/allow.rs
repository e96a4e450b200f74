//! Address ranges allowed to reach the gateway's admin endpoints on its public port
//! (`gateway.adminAllow`), written as CIDR blocks (`10.0.0.0/8`, `::1/128`) or plain addresses.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Deserializer};

/// One address block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `addr/prefix` or a plain address (a block of one).
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let text = text.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{text}` is not an address or CIDR block (e.g. 10.0.0.0/8)"))?;
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= bits)
                .ok_or_else(|| format!("`{text}`: the prefix must be 0 to {bits}"))?,
            None => bits,
        };
        Ok(Cidr { network, prefix })
    }

    /// Whether `addr` is in the block; an IPv4 address mapped into IPv6 counts as IPv4.
    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self.network, addr.to_canonical()) {
            (IpAddr::V4(network), IpAddr::V4(addr)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(network) & mask == u32::from(addr) & mask
            }
            (IpAddr::V6(network), IpAddr::V6(addr)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(network) & mask == u128::from(addr) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Cidr::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Blocks a client must be in; empty allows nobody.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowList(pub Vec<Cidr>);

impl AllowList {
    /// Loopback only: `127.0.0.0/8` and `::1`.
    pub fn loopback() -> Self {
        AllowList(vec![
            Cidr::parse("127.0.0.0/8").expect("valid block"),
            Cidr::parse("::1/128").expect("valid block"),
        ])
    }

    /// No block at all: allows nobody.
    pub fn nobody() -> Self {
        AllowList(Vec::new())
    }

    pub fn allows(&self, addr: IpAddr) -> bool {
        self.0.iter().any(|block| block.contains(addr))
    }
}

impl<'de> Deserialize<'de> for AllowList {
    /// A list of blocks, or one string of blocks separated by `,` (as `GOMS__*` writes it).
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            List(Vec<String>),
            Text(String),
        }
        let texts = match Raw::deserialize(deserializer)? {
            Raw::List(list) => list,
            Raw::Text(text) => text.split(',').map(str::to_string).collect(),
        };
        texts
            .iter()
            .filter(|text| !text.trim().is_empty())
            .map(|text| Cidr::parse(text))
            .collect::<Result<Vec<_>, _>>()
            .map(AllowList)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn blocks_hold_what_their_prefix_says() {
        let private = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(private.contains(ip("10.200.3.4")));
        assert!(!private.contains(ip("11.0.0.1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(Cidr::parse("192.168.1.7")
            .unwrap()
            .contains(ip("192.168.1.7")));
        assert!(!Cidr::parse("192.168.1.7")
            .unwrap()
            .contains(ip("192.168.1.8")));
        assert!(Cidr::parse("fd00::/8").unwrap().contains(ip("fd12::1")));
        assert!(!Cidr::parse("fd00::/8").unwrap().contains(ip("10.0.0.1")));
    }

    #[test]
    fn loopback_covers_both_families_and_mapped_addresses() {
        let loopback = AllowList::loopback();
        assert!(loopback.allows(ip("127.0.0.1")));
        assert!(loopback.allows(ip("127.1.2.3")));
        assert!(loopback.allows(ip("::1")));
        assert!(loopback.allows(ip("::ffff:127.0.0.1")));
        assert!(!loopback.allows(ip("172.17.0.1")));
    }

    #[test]
    fn bad_blocks_are_refused_with_the_reason() {
        assert!(Cidr::parse("10.0.0.0/33").unwrap_err().contains("0 to 32"));
        assert!(Cidr::parse("ten").unwrap_err().contains("not an address"));
    }
}
