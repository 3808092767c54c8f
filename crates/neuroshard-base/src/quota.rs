//! Caps on what a server holds for strangers (connections, request bytes, relay circuits), in
//! all and per caller address: a [`Quota`] counts, a [`Held`] share is given back when it is
//! dropped, however the call that took it ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::sync::LockExt;

/// Something a server holds for its callers (connections, bytes, circuits), counted in all
/// and per caller address, each with a cap.
#[derive(Debug)]
pub struct Quota {
    /// "connections", "bytes of requests".
    what: &'static str,
    max: usize,
    max_per_ip: usize,
    used: Mutex<(usize, HashMap<Option<IpAddr>, usize>)>,
}

impl Quota {
    /// At most `max` of `what` in all and `max_per_ip` for one caller address.
    pub fn new(what: &'static str, max: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(Self {
            what,
            max,
            max_per_ip,
            used: Mutex::new((0, HashMap::new())),
        })
    }

    /// Takes `n` for a caller at `ip`, or says which cap it would pass. Callers without an
    /// address (relayed) share one address's cap; an IPv6 address counts as its /64, what one
    /// home is given.
    fn take(&self, ip: Option<IpAddr>, n: usize) -> Result<(), String> {
        let mut used = self.used.lock_or_recover();
        let (total, per_ip) = &mut *used;
        if *total + n > self.max {
            return Err(format!(
                "{total} {} are held, and this server holds at most {}",
                self.what, self.max
            ));
        }
        let from_ip = per_ip.get(&bucket(ip)).copied().unwrap_or(0);
        if from_ip + n > self.max_per_ip {
            let who = match ip {
                Some(ip) => format!("{ip} holds"),
                None => "relayed callers hold".to_string(),
            };
            return Err(format!(
                "{who} {from_ip} {}, the most one address may is {}",
                self.what, self.max_per_ip
            ));
        }
        *per_ip.entry(bucket(ip)).or_default() += n;
        *total += n;
        Ok(())
    }

    /// How much is held in all.
    pub fn used(&self) -> usize {
        self.used.lock_or_recover().0
    }

    fn give(&self, ip: Option<IpAddr>, n: usize) {
        let mut used = self.used.lock_or_recover();
        let (total, per_ip) = &mut *used;
        *total -= n;
        if let Some(from_ip) = per_ip.get_mut(&bucket(ip)) {
            *from_ip -= n;
            if *from_ip == 0 {
                per_ip.remove(&bucket(ip));
            }
        }
    }
}

/// The address a caller counts as: an IPv6 address's /64, any other address itself, and
/// `None` (relayed) as one address of its own.
fn bucket(ip: Option<IpAddr>) -> Option<IpAddr> {
    ip.map(|ip| match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let [a, b, c, d, ..] = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(a, b, c, d, 0, 0, 0, 0))
        }
        v4 => v4,
    })
}

/// What one caller holds of a [`Quota`], given back when dropped: a connection's slot, a
/// request body's bytes.
#[derive(Debug)]
pub struct Held {
    quota: Arc<Quota>,
    ip: Option<IpAddr>,
    n: usize,
}

impl Held {
    /// Takes `n` of `quota` for a caller at `ip`.
    pub fn take(quota: &Arc<Quota>, ip: Option<IpAddr>, n: usize) -> Result<Self, String> {
        quota.take(ip, n)?;
        Ok(Self {
            quota: quota.clone(),
            ip,
            n,
        })
    }

    /// Takes `n` more.
    pub fn grow(&mut self, n: usize) -> Result<(), String> {
        self.quota.take(self.ip, n)?;
        self.n += n;
        Ok(())
    }
}

impl Held {
    /// How much is held.
    pub fn amount(&self) -> usize {
        self.n
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.quota.give(self.ip, self.n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_cap_in_all_and_per_address_and_give_back_on_drop() {
        let quota = Quota::new("connections", 3, 2);
        let (a, b): (IpAddr, IpAddr) = ([192, 0, 2, 1].into(), [192, 0, 2, 2].into());
        let first = Held::take(&quota, Some(a), 1).unwrap();
        let _second = Held::take(&quota, Some(a), 1).unwrap();
        let err = Held::take(&quota, Some(a), 1).unwrap_err();
        assert!(err.contains("192.0.2.1 holds 2 connections"), "{err}");
        let _third = Held::take(&quota, Some(b), 1).unwrap();
        let err = Held::take(&quota, None, 1).unwrap_err();
        assert!(err.contains("3 connections are held"), "{err}");
        drop(first);
        let again = Held::take(&quota, Some(a), 1).unwrap();
        drop(again);
        assert_eq!(quota.used(), 2, "two left held");

        // Relayed callers share one address's cap; an IPv6 /64 is one address.
        let quota = Quota::new("connections", 10, 2);
        let _relayed: Vec<_> = (0..2)
            .map(|_| Held::take(&quota, None, 1).unwrap())
            .collect();
        let err = Held::take(&quota, None, 1).unwrap_err();
        assert!(err.contains("relayed callers hold 2"), "{err}");
        let home = |last: u16| Some(IpAddr::from([0x2001, 0xdb8, 1, 2, 0, 0, 0, last]));
        let _v6: Vec<_> = (1..3)
            .map(|i| Held::take(&quota, home(i), 1).unwrap())
            .collect();
        assert!(Held::take(&quota, home(9), 1).is_err(), "the same /64");
        let elsewhere = Some(IpAddr::from([0x2001, 0xdb8, 1, 3, 0, 0, 0, 1]));
        assert!(Held::take(&quota, elsewhere, 1).is_ok());

        let bytes = Quota::new("bytes of requests", 100, 60);
        let mut body = Held::take(&bytes, Some(a), 10).unwrap();
        body.grow(50).unwrap();
        assert!(body.grow(1).is_err(), "over the address's share");
        assert_eq!(body.amount(), 60);
        let other = Held::take(&bytes, Some(b), 40).unwrap();
        assert!(Held::take(&bytes, Some(b), 1).is_err(), "over the total");
        drop(body);
        assert_eq!(bytes.used(), 40);
        drop(other);
        assert_eq!(bytes.used(), 0);
        assert!(bytes.used.lock_or_recover().1.is_empty());
    }
}
