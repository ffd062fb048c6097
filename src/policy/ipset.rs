//! Sets of IP addresses as sorted, merged ranges, one list per family. Policies resolve
//! aliases to these sets; filter rules print them the way Tailscale does (an address, a
//! prefix, or `first-last` when a range is neither).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Inclusive ranges over one address family, kept sorted, disjoint and non-adjacent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Ranges(Vec<(u128, u128)>);

impl Ranges {
    fn from_points(points: Vec<u128>) -> Ranges {
        Ranges::from_ranges(points.into_iter().map(|x| (x, x)).collect())
    }

    /// Any ranges, sorted and merged.
    fn from_ranges(mut ranges: Vec<(u128, u128)>) -> Ranges {
        ranges.sort_unstable();
        let mut out: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
        for (first, last) in ranges {
            match out.last_mut() {
                Some((_, end)) if first <= end.saturating_add(1) => *end = (*end).max(last),
                _ => out.push((first, last)),
            }
        }
        Ranges(out)
    }

    fn add(&mut self, first: u128, last: u128) {
        let mut merged = (first, last);
        let mut out = Vec::with_capacity(self.0.len() + 1);
        let mut placed = false;
        for &(a, b) in &self.0 {
            if b.saturating_add(1) < merged.0 {
                out.push((a, b));
            } else if merged.1.saturating_add(1) < a {
                if !placed {
                    out.push(merged);
                    placed = true;
                }
                out.push((a, b));
            } else {
                merged = (merged.0.min(a), merged.1.max(b));
            }
        }
        if !placed {
            out.push(merged);
        }
        self.0 = out;
    }

    /// Both lists merged in one pass.
    fn union(&mut self, other: &Ranges) {
        if other.0.is_empty() {
            return;
        }
        let mut all: Vec<(u128, u128)> = Vec::with_capacity(self.0.len() + other.0.len());
        let (mut a, mut b) = (self.0.iter().peekable(), other.0.iter().peekable());
        while let (Some(x), Some(y)) = (a.peek(), b.peek()) {
            all.push(if x.0 <= y.0 {
                *a.next().unwrap()
            } else {
                *b.next().unwrap()
            });
        }
        all.extend(a.chain(b).copied());
        let mut out: Vec<(u128, u128)> = Vec::with_capacity(all.len());
        for (first, last) in all {
            match out.last_mut() {
                Some((_, end)) if first <= end.saturating_add(1) => *end = (*end).max(last),
                _ => out.push((first, last)),
            }
        }
        self.0 = out;
    }

    fn remove(&mut self, first: u128, last: u128) {
        let mut out = Vec::with_capacity(self.0.len() + 1);
        for &(a, b) in &self.0 {
            if b < first || a > last {
                out.push((a, b));
                continue;
            }
            if a < first {
                out.push((a, first - 1));
            }
            if b > last {
                out.push((last + 1, b));
            }
        }
        self.0 = out;
    }

    fn contains(&self, x: u128) -> bool {
        let i = self.0.partition_point(|&(_, b)| b < x);
        self.0.get(i).is_some_and(|&(a, _)| a <= x)
    }

    fn overlaps(&self, first: u128, last: u128) -> bool {
        let i = self.0.partition_point(|&(_, b)| b < first);
        self.0.get(i).is_some_and(|&(a, _)| a <= last)
    }

    fn covers(&self, first: u128, last: u128) -> bool {
        let i = self.0.partition_point(|&(_, b)| b < first);
        self.0.get(i).is_some_and(|&(a, b)| a <= first && last <= b)
    }
}

/// A set of IPv4 and IPv6 addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IpSet {
    v4: Ranges,
    v6: Ranges,
}

fn net_bounds(net: &IpNet) -> (bool, u128, u128) {
    match net {
        IpNet::V4(n) => (
            true,
            u32::from(n.network()) as u128,
            u32::from(n.broadcast()) as u128,
        ),
        IpNet::V6(n) => (false, u128::from(n.network()), u128::from(n.broadcast())),
    }
}

fn addr_bits(ip: IpAddr) -> (bool, u128) {
    match ip {
        IpAddr::V4(a) => (true, u32::from(a) as u128),
        IpAddr::V6(a) => (false, u128::from(a)),
    }
}

impl IpSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every address of both families (`*` as a filter destination).
    pub fn all() -> Self {
        let mut s = Self::new();
        s.v4.add(0, u32::MAX as u128);
        s.v6.add(0, u128::MAX);
        s
    }

    /// A set of many addresses at once: sorted and merged in one pass (adding them one by
    /// one would cost a pass over the ranges each).
    pub fn from_addrs(addrs: impl IntoIterator<Item = IpAddr>) -> Self {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for ip in addrs {
            match addr_bits(ip) {
                (true, x) => v4.push(x),
                (false, x) => v6.push(x),
            }
        }
        IpSet {
            v4: Ranges::from_points(v4),
            v6: Ranges::from_points(v6),
        }
    }

    /// The union of many sets, merged in one pass.
    pub fn union_of<'a>(sets: impl IntoIterator<Item = &'a IpSet>) -> Self {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for s in sets {
            v4.extend_from_slice(&s.v4.0);
            v6.extend_from_slice(&s.v6.0);
        }
        IpSet {
            v4: Ranges::from_ranges(v4),
            v6: Ranges::from_ranges(v6),
        }
    }

    pub fn from_nets(nets: impl IntoIterator<Item = IpNet>) -> Self {
        let mut s = Self::new();
        for n in nets {
            s.add_net(&n);
        }
        s
    }

    fn family(&mut self, v4: bool) -> &mut Ranges {
        if v4 { &mut self.v4 } else { &mut self.v6 }
    }

    pub fn add_net(&mut self, net: &IpNet) {
        let (v4, a, b) = net_bounds(net);
        self.family(v4).add(a, b);
    }

    pub fn add_addr(&mut self, ip: IpAddr) {
        let (v4, x) = addr_bits(ip);
        self.family(v4).add(x, x);
    }

    pub fn remove_net(&mut self, net: &IpNet) {
        let (v4, a, b) = net_bounds(net);
        self.family(v4).remove(a, b);
    }

    pub fn union(&mut self, other: &IpSet) {
        self.v4.union(&other.v4);
        self.v6.union(&other.v6);
    }

    pub fn is_empty(&self) -> bool {
        self.v4.0.is_empty() && self.v6.0.is_empty()
    }

    /// The set's address when it holds exactly one.
    pub fn single(&self) -> Option<IpAddr> {
        match (&self.v4.0[..], &self.v6.0[..]) {
            ([(a, b)], []) if a == b => Some(IpAddr::V4(std::net::Ipv4Addr::from(*a as u32))),
            ([], [(a, b)]) if a == b => Some(IpAddr::V6(std::net::Ipv6Addr::from(*a))),
            _ => None,
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let (v4, x) = addr_bits(ip);
        if v4 {
            self.v4.contains(x)
        } else {
            self.v6.contains(x)
        }
    }

    pub fn overlaps_net(&self, net: &IpNet) -> bool {
        let (v4, a, b) = net_bounds(net);
        if v4 {
            self.v4.overlaps(a, b)
        } else {
            self.v6.overlaps(a, b)
        }
    }

    pub fn contains_net(&self, net: &IpNet) -> bool {
        let (v4, a, b) = net_bounds(net);
        if v4 {
            self.v4.covers(a, b)
        } else {
            self.v6.covers(a, b)
        }
    }

    /// Whether every address of `self` is in `other`.
    pub fn is_subset_of(&self, other: &IpSet) -> bool {
        self.v4.0.iter().all(|&(a, b)| other.v4.covers(a, b))
            && self.v6.0.iter().all(|&(a, b)| other.v6.covers(a, b))
    }

    /// Tailscale's text form: one entry per range, IPv4 first.
    pub fn strings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for &(a, b) in &self.v4.0 {
            out.push(range_string(true, a, b));
        }
        for &(a, b) in &self.v6.0 {
            out.push(range_string(false, a, b));
        }
        out
    }

    /// The smallest list of prefixes that covers exactly this set.
    pub fn prefixes(&self) -> Vec<IpNet> {
        let mut out = Vec::new();
        for &(a, b) in &self.v4.0 {
            let (a, b) = (Ipv4Addr::from(a as u32), Ipv4Addr::from(b as u32));
            out.extend(ipnet::Ipv4Subnets::new(a, b, 0).map(IpNet::V4));
        }
        for &(a, b) in &self.v6.0 {
            let (a, b) = (Ipv6Addr::from(a), Ipv6Addr::from(b));
            out.extend(ipnet::Ipv6Subnets::new(a, b, 0).map(IpNet::V6));
        }
        out
    }
}

fn addr(v4: bool, x: u128) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(x as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(x))
    }
}

fn range_string(v4: bool, a: u128, b: u128) -> String {
    if a == b {
        return addr(v4, a).to_string();
    }
    let bits = if v4 { 32 } else { 128 };
    let size = b - a;
    // A prefix: the range's size is 2^k - 1 and its start is aligned to it.
    if size.checked_add(1).is_none_or(|n| n.is_power_of_two()) && a & size == 0 {
        let host_bits = 128 - size.leading_zeros();
        let len = (bits - host_bits) as u8;
        let net = if v4 {
            IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a as u32), len).expect("valid length"))
        } else {
            IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), len).expect("valid length"))
        };
        return net.to_string();
    }
    format!("{}-{}", addr(v4, a), addr(v4, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn ranges_merge_and_print_as_tailscale_does() {
        let mut s = IpSet::new();
        s.add_net(&net("100.64.0.0/10"));
        s.add_net(&net("fd7a:115c:a1e0::/48"));
        s.remove_net(&net("100.115.92.0/23"));
        assert_eq!(
            s.strings(),
            [
                "100.64.0.0-100.115.91.255",
                "100.115.94.0-100.127.255.255",
                "fd7a:115c:a1e0::/48"
            ]
        );
        s.add_addr("100.115.92.1".parse().unwrap());
        assert!(s.contains("100.115.92.1".parse().unwrap()));
        assert!(!s.contains("100.115.92.2".parse().unwrap()));
        assert!(s.overlaps_net(&net("100.115.92.0/30")));
        assert!(!s.contains_net(&net("100.115.92.0/30")));
    }

    #[test]
    fn many_addresses_at_once_equal_one_by_one() {
        let addrs: Vec<IpAddr> = [5u8, 1, 2, 9, 3, 200, 4, 2]
            .iter()
            .map(|x| IpAddr::V4(Ipv4Addr::new(100, 64, 0, *x)))
            .chain(["fd7a::1".parse().unwrap(), "fd7a::2".parse().unwrap()])
            .collect();
        let mut one_by_one = IpSet::new();
        for a in &addrs {
            one_by_one.add_addr(*a);
        }
        assert_eq!(IpSet::from_addrs(addrs), one_by_one);
    }

    #[test]
    fn adjacent_addresses_join_into_a_range_or_prefix() {
        let mut s = IpSet::new();
        for last in [1, 2, 0, 3] {
            s.add_addr(IpAddr::V4(Ipv4Addr::new(10, 0, 0, last)));
        }
        assert_eq!(s.strings(), ["10.0.0.0/30"]);
        s.add_addr("10.0.0.4".parse().unwrap());
        assert_eq!(s.strings(), ["10.0.0.0-10.0.0.4"]);
        assert_eq!(
            s.prefixes(),
            [net("10.0.0.0/30"), net("10.0.0.4/32")],
            "prefixes cover the range exactly"
        );
        assert_eq!(IpSet::all().strings(), ["0.0.0.0/0", "::/0"]);
    }
}
