//! Deterministic address allocation from the configured prefixes. Runs inside
//! `Registry::apply`, so every member hands out the same address to the same node and two
//! members can never allocate one address twice.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// Addresses inside 100.64.0.0/10 that Tailscale reserves: MagicDNS's 100.100.100.100 and
/// the ChromeOS VM range 100.115.92.0/23.
fn reserved_v4(ip: Ipv4Addr) -> bool {
    let quad100 = Ipv4Addr::new(100, 100, 100, 100);
    let chromeos: Ipv4Net = "100.115.92.0/23".parse().expect("valid literal");
    ip == quad100 || chromeos.contains(&ip)
}

/// The lowest free host address of `net` (skipping network and broadcast addresses).
pub fn next_v4(net: Ipv4Net, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    let first = u32::from(net.network()).checked_add(1)?;
    let last = u32::from(net.broadcast()).checked_sub(1)?;
    (first..=last)
        .map(Ipv4Addr::from)
        .find(|ip| !used.contains(ip) && !reserved_v4(*ip))
}

/// The lowest free address of `net` after the network address.
pub fn next_v6(net: Ipv6Net, used: &BTreeSet<Ipv6Addr>) -> Option<Ipv6Addr> {
    let first = u128::from(net.network()).checked_add(1)?;
    let last = u128::from(net.broadcast());
    let mut candidate = first;
    // `used` is sorted, so walk it instead of probing up to 2^80 addresses.
    for ip in used.range(Ipv6Addr::from(first)..) {
        let n = u128::from(*ip);
        if n > candidate {
            break;
        }
        if n == candidate {
            candidate = candidate.checked_add(1)?;
        }
    }
    (candidate <= last).then(|| Ipv6Addr::from(candidate))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_starts_at_first_host_and_skips_used_and_reserved() {
        let net: Ipv4Net = "100.64.0.0/10".parse().unwrap();
        let mut used = BTreeSet::new();
        assert_eq!(next_v4(net, &used), Some(Ipv4Addr::new(100, 64, 0, 1)));
        used.insert(Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!(next_v4(net, &used), Some(Ipv4Addr::new(100, 64, 0, 2)));
        let small: Ipv4Net = "100.100.100.100/31".parse().unwrap();
        assert_eq!(next_v4(small, &BTreeSet::new()), None);
    }

    #[test]
    fn v4_pool_exhausts() {
        let net: Ipv4Net = "10.0.0.0/30".parse().unwrap();
        let mut used = BTreeSet::new();
        for _ in 0..2 {
            let ip = next_v4(net, &used).unwrap();
            assert!(used.insert(ip));
        }
        assert_eq!(next_v4(net, &used), None);
    }

    #[test]
    fn v6_fills_gaps_in_order() {
        let net: Ipv6Net = "fd7a:115c:a1e0::/48".parse().unwrap();
        let mut used = BTreeSet::new();
        let a = next_v6(net, &used).unwrap();
        assert_eq!(a, "fd7a:115c:a1e0::1".parse::<Ipv6Addr>().unwrap());
        used.insert(a);
        used.insert("fd7a:115c:a1e0::3".parse().unwrap());
        assert_eq!(
            next_v6(net, &used).unwrap(),
            "fd7a:115c:a1e0::2".parse::<Ipv6Addr>().unwrap()
        );
        used.insert("fd7a:115c:a1e0::2".parse().unwrap());
        assert_eq!(
            next_v6(net, &used).unwrap(),
            "fd7a:115c:a1e0::4".parse::<Ipv6Addr>().unwrap()
        );
    }
}
