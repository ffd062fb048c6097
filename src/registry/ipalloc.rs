//! Deterministic address allocation from the cluster's prefixes. Runs inside
//! `Registry::apply`, so every member hands out the same address to the same node and two
//! members can never allocate one address twice.
//!
//! Allocation continues after the last address handed out (wrapping at the end of the
//! prefix), so it costs O(1) per node while the pool is sparse, and an address freed by a
//! deleted node is not reused until the pool wraps: peers may still hold the old node.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// Addresses inside 100.64.0.0/10 that Tailscale reserves: MagicDNS's 100.100.100.100 and
/// the ChromeOS VM range 100.115.92.0/23.
fn reserved_v4(ip: Ipv4Addr) -> bool {
    let quad100 = Ipv4Addr::new(100, 100, 100, 100);
    let chromeos: Ipv4Net = "100.115.92.0/23".parse().expect("valid literal");
    ip == quad100 || chromeos.contains(&ip)
}

/// The first free candidate in `first..=last` after `after`, wrapping around once.
fn next_free(
    first: u128,
    last: u128,
    after: Option<u128>,
    free: impl Fn(u128) -> bool,
) -> Option<u128> {
    if first > last {
        return None;
    }
    let start = match after {
        Some(a) if a >= first && a < last => a + 1,
        _ => first,
    };
    (start..=last)
        .chain(first..start)
        .find(|candidate| free(*candidate))
}

/// The next free host address of `net` after `after` (skipping network, broadcast and
/// reserved addresses).
pub fn next_v4(
    net: Ipv4Net,
    after: Option<Ipv4Addr>,
    used: impl Fn(Ipv4Addr) -> bool,
) -> Option<Ipv4Addr> {
    let first = u32::from(net.network()).checked_add(1)?;
    let last = u32::from(net.broadcast()).checked_sub(1)?;
    let free = |n: u128| {
        let ip = Ipv4Addr::from(n as u32);
        !used(ip) && !reserved_v4(ip)
    };
    next_free(
        first.into(),
        last.into(),
        after.map(|a| u32::from(a).into()),
        free,
    )
    .map(|n| Ipv4Addr::from(n as u32))
}

/// The next free address of `net` after `after` (skipping the network address).
pub fn next_v6(
    net: Ipv6Net,
    after: Option<Ipv6Addr>,
    used: impl Fn(Ipv6Addr) -> bool,
) -> Option<Ipv6Addr> {
    let first = u128::from(net.network()).checked_add(1)?;
    let last = u128::from(net.broadcast());
    next_free(first, last, after.map(u128::from), |n| {
        !used(Ipv6Addr::from(n))
    })
    .map(Ipv6Addr::from)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn v4_starts_at_first_host_and_skips_used_and_reserved() {
        let net: Ipv4Net = "100.64.0.0/10".parse().unwrap();
        let mut used = BTreeSet::new();
        let first = next_v4(net, None, |ip| used.contains(&ip)).unwrap();
        assert_eq!(first, Ipv4Addr::new(100, 64, 0, 1));
        used.insert(first);
        assert_eq!(
            next_v4(net, Some(first), |ip| used.contains(&ip)),
            Some(Ipv4Addr::new(100, 64, 0, 2))
        );
        let small: Ipv4Net = "100.100.100.100/31".parse().unwrap();
        assert_eq!(next_v4(small, None, |_| false), None);
        let near_quad100 = Ipv4Addr::new(100, 100, 100, 99);
        assert_eq!(
            next_v4(net, Some(near_quad100), |_| false),
            Some(Ipv4Addr::new(100, 100, 100, 101))
        );
    }

    #[test]
    fn v4_continues_after_the_last_and_wraps_before_exhausting() {
        let net: Ipv4Net = "10.0.0.0/29".parse().unwrap(); // hosts .1 to .6
        let mut used = BTreeSet::new();
        let mut last = None;
        for want in 1..=6u8 {
            let ip = next_v4(net, last, |ip| used.contains(&ip)).unwrap();
            assert_eq!(ip, Ipv4Addr::new(10, 0, 0, want));
            used.insert(ip);
            last = Some(ip);
        }
        assert_eq!(next_v4(net, last, |ip| used.contains(&ip)), None);
        // .2 is freed: it is found again only by wrapping around.
        used.remove(&Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(
            next_v4(net, last, |ip| used.contains(&ip)),
            Some(Ipv4Addr::new(10, 0, 0, 2))
        );
    }

    #[test]
    fn a_freed_address_is_not_reused_at_once() {
        let net: Ipv4Net = "100.64.0.0/10".parse().unwrap();
        let used: BTreeSet<Ipv4Addr> = [Ipv4Addr::new(100, 64, 0, 2)].into();
        // .1 was handed out and freed; the next node gets .3, not .1.
        let next = next_v4(net, Some(Ipv4Addr::new(100, 64, 0, 2)), |ip| {
            used.contains(&ip)
        });
        assert_eq!(next, Some(Ipv4Addr::new(100, 64, 0, 3)));
    }

    #[test]
    fn v6_continues_after_the_last() {
        let net: Ipv6Net = "fd7a:115c:a1e0::/48".parse().unwrap();
        let a = next_v6(net, None, |_| false).unwrap();
        assert_eq!(a, "fd7a:115c:a1e0::1".parse::<Ipv6Addr>().unwrap());
        let used: BTreeSet<Ipv6Addr> = ["fd7a:115c:a1e0::3".parse().unwrap()].into();
        let after: Ipv6Addr = "fd7a:115c:a1e0::2".parse().unwrap();
        assert_eq!(
            next_v6(net, Some(after), |ip| used.contains(&ip)).unwrap(),
            "fd7a:115c:a1e0::4".parse::<Ipv6Addr>().unwrap()
        );
    }
}
