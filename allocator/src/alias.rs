//! SID alias epochs (seed 000 §3.3, ARCHITECTURE §4).
//!
//! Every `t_sid` a new epoch starts: each access switch (SID) gets `n` fresh aliases, drawn
//! uniformly at random from `[1, 2^a)` among the values no valid epoch uses. An epoch's aliases
//! route for `k · t_sid` from its start and are used for new addresses only while the epoch is the
//! newest. Epochs start at least `t_sid` apart and end `k · t_sid` after their start, so at most
//! `k` epochs are valid at once and `SIDs · n · k` alias values are in use at most: the schedule
//! needs `SIDs · n · k < 2^a` (alias 0 is never used), which [`AliasSchedule::new`] checks.

use std::collections::{HashMap, VecDeque};

use crate::rng::Csprng;
use crate::Sid;

/// Alias configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AliasConfig {
    /// Alias width `a` in bits (1..=24).
    pub alias_bits: u8,
    /// Aliases per SID per epoch, `n` (>= 1).
    pub aliases_per_sid: u32,
    /// Epochs an alias stays valid, `k` (>= 1): validity is `k · t_sid`.
    pub k: u32,
    /// Epoch period `t_sid`, milliseconds (> 0).
    pub t_sid_ms: u64,
    /// The access switches' SIDs.
    pub sids: Vec<Sid>,
}

/// Why an alias configuration is impossible.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AliasConfigError {
    /// `a` outside 1..=24.
    #[error("alias_bits = {0}: must be between 1 and 24")]
    AliasBits(u8),
    /// n, k or t_sid is zero.
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    /// No SIDs.
    #[error("no access switch (SID) is configured, so there is nothing to alias")]
    NoSids,
    /// A SID is listed twice.
    #[error("SID {0} is configured twice")]
    DuplicateSid(Sid),
    /// The uniqueness bound is broken.
    #[error(
        "impossible alias configuration: SIDs·n·k = {sids}·{n}·{k} = {need} aliases must be valid \
         at once, but only 2^a - 1 = {have} non-zero aliases exist (a = {alias_bits}); the bound \
         SIDs·n·k < 2^a is broken: lower n (aliases_per_sid) or k, or raise alias_bits"
    )]
    Bound {
        /// Number of SIDs.
        sids: usize,
        /// n.
        n: u32,
        /// k.
        k: u32,
        /// SIDs·n·k.
        need: u128,
        /// 2^a - 1.
        have: u128,
        /// a.
        alias_bits: u8,
    },
}

impl AliasConfig {
    /// Checks the configuration, naming the broken bound if any.
    pub fn validate(&self) -> Result<(), AliasConfigError> {
        if !(1..=24).contains(&self.alias_bits) {
            return Err(AliasConfigError::AliasBits(self.alias_bits));
        }
        if self.aliases_per_sid == 0 {
            return Err(AliasConfigError::Zero("aliases_per_sid (n)"));
        }
        if self.k == 0 {
            return Err(AliasConfigError::Zero("k"));
        }
        if self.t_sid_ms == 0 {
            return Err(AliasConfigError::Zero("t_sid"));
        }
        if self.sids.is_empty() {
            return Err(AliasConfigError::NoSids);
        }
        let mut sorted = self.sids.clone();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(AliasConfigError::DuplicateSid(w[0]));
        }
        let need = self.sids.len() as u128 * u128::from(self.aliases_per_sid) * u128::from(self.k);
        let have = (1u128 << self.alias_bits) - 1;
        if need > have {
            return Err(AliasConfigError::Bound {
                sids: self.sids.len(),
                n: self.aliases_per_sid,
                k: self.k,
                need,
                have,
                alias_bits: self.alias_bits,
            });
        }
        Ok(())
    }

    /// `k · t_sid`, milliseconds.
    pub fn validity_ms(&self) -> u64 {
        self.t_sid_ms.saturating_mul(u64::from(self.k))
    }
}

/// One epoch's alias set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AliasEpoch {
    /// Epoch number, increasing from 1.
    pub epoch: u64,
    /// When it started (ms, the allocator's clock).
    pub start_ms: u64,
    /// When its aliases stop routing (`start + k · t_sid`).
    pub valid_until_ms: u64,
    /// SID → its aliases, sorted by SID.
    pub aliases: Vec<(Sid, Vec<u32>)>,
}

/// What [`AliasSchedule::advance`] changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AliasChanges {
    /// Epochs that stopped being valid.
    pub expired: Vec<u64>,
    /// The epoch that started, if one did.
    pub started: Option<AliasEpoch>,
}

/// The valid epochs and the rotation clock.
#[derive(Debug)]
pub struct AliasSchedule {
    cfg: AliasConfig,
    /// Valid epochs, oldest first.
    epochs: VecDeque<AliasEpoch>,
    /// alias → (SID, epoch) for every valid alias.
    in_use: HashMap<u32, (Sid, u64)>,
    next_epoch: u64,
    next_rotation_ms: u64,
}

impl AliasSchedule {
    /// An empty schedule; the first [`advance`](Self::advance) starts epoch 1.
    pub fn new(cfg: AliasConfig) -> Result<Self, AliasConfigError> {
        cfg.validate()?;
        Ok(AliasSchedule {
            cfg,
            epochs: VecDeque::new(),
            in_use: HashMap::new(),
            next_epoch: 1,
            next_rotation_ms: 0,
        })
    }

    /// Rebuilds a schedule from stored epochs (any order). Epochs no longer valid at `now_ms` are
    /// returned in `AliasChanges::expired` for the journal; the next `advance` rotates if due.
    /// Epochs whose aliases clash with an earlier one or that name an unknown SID are dropped and
    /// reported as expired too (the configuration changed), so uniqueness holds after any restart.
    pub fn restore(
        cfg: AliasConfig,
        mut stored: Vec<AliasEpoch>,
        now_ms: u64,
    ) -> Result<(Self, AliasChanges), AliasConfigError> {
        let mut s = AliasSchedule::new(cfg)?;
        let mut changes = AliasChanges::default();
        stored.sort_by_key(|e| e.epoch);
        for e in stored {
            s.next_epoch = s.next_epoch.max(e.epoch + 1);
            // An epoch is kept only if it fits today's configuration exactly (every SID, n
            // aliases each, in range, unique): the capacity argument of `advance` relies on it.
            let mut fresh = std::collections::HashSet::new();
            let clash = e.aliases.len() != s.cfg.sids.len()
                || e.aliases.iter().any(|(sid, list)| {
                    !s.cfg.sids.contains(sid)
                        || list.len() != s.cfg.aliases_per_sid as usize
                        || list.iter().any(|a| {
                            *a == 0
                                || *a >> s.cfg.alias_bits != 0
                                || s.in_use.contains_key(a)
                                || !fresh.insert(*a)
                        })
                });
            if e.valid_until_ms <= now_ms || clash {
                changes.expired.push(e.epoch);
                continue;
            }
            for (sid, list) in &e.aliases {
                for &a in list {
                    s.in_use.insert(a, (*sid, e.epoch));
                }
            }
            s.next_rotation_ms = e.start_ms.saturating_add(s.cfg.t_sid_ms);
            s.epochs.push_back(e);
        }
        // A restored set may hold more than k epochs if t_sid shrank; uniqueness still holds,
        // and new draws check in_use, so only the bound's capacity argument needs k; drop the
        // oldest extra ones.
        while s.epochs.len() > s.cfg.k as usize {
            if let Some(old) = s.epochs.pop_front() {
                s.forget(&old);
                changes.expired.push(old.epoch);
            }
        }
        Ok((s, changes))
    }

    /// The configuration.
    pub fn config(&self) -> &AliasConfig {
        &self.cfg
    }

    /// Expires epochs whose validity ended by `now_ms` and starts a new epoch if `t_sid` has passed
    /// since the newest began (or none exists).
    pub fn advance(&mut self, now_ms: u64, rng: &mut Csprng) -> AliasChanges {
        let mut changes = AliasChanges::default();
        while self
            .epochs
            .front()
            .is_some_and(|e| e.valid_until_ms <= now_ms)
        {
            if let Some(old) = self.epochs.pop_front() {
                self.forget(&old);
                changes.expired.push(old.epoch);
            }
        }
        if self.epochs.is_empty() || now_ms >= self.next_rotation_ms {
            // At most k - 1 epochs are valid here (they started at least t_sid apart, within the
            // last k·t_sid, and the newest at least t_sid ago), so with the validated bound at
            // least n·SIDs aliases are free.
            if self.epochs.len() >= self.cfg.k as usize {
                if let Some(old) = self.epochs.pop_front() {
                    self.forget(&old);
                    changes.expired.push(old.epoch);
                }
            }
            let epoch = self.draw(now_ms, rng);
            changes.started = Some(epoch.clone());
            self.epochs.push_back(epoch);
            self.next_rotation_ms = now_ms.saturating_add(self.cfg.t_sid_ms);
        }
        changes
    }

    /// The newest epoch (the one new addresses use).
    pub fn current(&self) -> Option<&AliasEpoch> {
        self.epochs.back()
    }

    /// All valid epochs, oldest first.
    pub fn valid_epochs(&self) -> impl Iterator<Item = &AliasEpoch> {
        self.epochs.iter()
    }

    /// A uniformly random alias of `sid` in the newest epoch.
    pub fn pick(&self, sid: Sid, rng: &mut Csprng) -> Option<u32> {
        let e = self.current()?;
        let list = &e.aliases.iter().find(|(s, _)| *s == sid)?.1;
        list.get(rng.below(list.len() as u64) as usize).copied()
    }

    /// The SID that `alias` names in a valid epoch.
    pub fn lookup(&self, alias: u32) -> Option<Sid> {
        self.in_use.get(&alias).map(|&(sid, _)| sid)
    }

    /// When the next rotation is due.
    pub fn next_rotation_ms(&self) -> u64 {
        self.next_rotation_ms
    }

    fn forget(&mut self, e: &AliasEpoch) {
        for (_, list) in &e.aliases {
            for a in list {
                self.in_use.remove(a);
            }
        }
    }

    fn draw(&mut self, now_ms: u64, rng: &mut Csprng) -> AliasEpoch {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        let space = 1u64 << self.cfg.alias_bits;
        let needed = self.cfg.sids.len() as u64 * u64::from(self.cfg.aliases_per_sid);
        let mut sids = self.cfg.sids.clone();
        sids.sort_unstable();
        // Sparse: rejection sampling over [1, 2^a). Dense (more than half taken once this epoch
        // is drawn): list the free values and pick without replacement. Both are uniform.
        let dense = (self.in_use.len() as u64 + needed) * 2 > space;
        let mut free: Vec<u32> = if dense {
            (1..space as u32)
                .filter(|a| !self.in_use.contains_key(a))
                .collect()
        } else {
            Vec::new()
        };
        let mut aliases = Vec::with_capacity(sids.len());
        for sid in sids {
            let mut list = Vec::with_capacity(self.cfg.aliases_per_sid as usize);
            for _ in 0..self.cfg.aliases_per_sid {
                let a = if dense {
                    // Non-empty: the bound leaves at least `needed` free values (see advance).
                    let i = rng.below(free.len() as u64) as usize;
                    free.swap_remove(i)
                } else {
                    loop {
                        let a = 1 + rng.below(space - 1) as u32;
                        if !self.in_use.contains_key(&a) {
                            break a;
                        }
                    }
                };
                self.in_use.insert(a, (sid, epoch));
                list.push(a);
            }
            aliases.push((sid, list));
        }
        AliasEpoch {
            epoch,
            start_ms: now_ms,
            valid_until_ms: now_ms.saturating_add(self.cfg.validity_ms()),
            aliases,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn cfg(bits: u8, n: u32, k: u32, sids: u16) -> AliasConfig {
        AliasConfig {
            alias_bits: bits,
            aliases_per_sid: n,
            k,
            t_sid_ms: 1000,
            sids: (1..=sids).collect(),
        }
    }

    #[test]
    fn impossible_bound_is_refused_with_the_bound_named() {
        // 3 SIDs · 5 · 1 = 15 = 2^4 - 1: fits exactly.
        assert!(cfg(4, 5, 1, 3).validate().is_ok());
        // 4 · 2 · 2 = 16 > 15.
        let err = cfg(4, 2, 2, 4).validate().unwrap_err();
        assert!(matches!(
            err,
            AliasConfigError::Bound {
                need: 16,
                have: 15,
                ..
            }
        ));
        let msg = err.to_string();
        assert!(msg.contains("SIDs·n·k < 2^a"), "{msg}");
        assert!(matches!(
            cfg(0, 1, 1, 1).validate(),
            Err(AliasConfigError::AliasBits(0))
        ));
        assert!(matches!(
            cfg(8, 0, 1, 1).validate(),
            Err(AliasConfigError::Zero(_))
        ));
        assert!(matches!(
            cfg(8, 1, 0, 1).validate(),
            Err(AliasConfigError::Zero(_))
        ));
        let mut dup = cfg(8, 1, 1, 2);
        dup.sids.push(1);
        assert!(matches!(
            dup.validate(),
            Err(AliasConfigError::DuplicateSid(1))
        ));
    }

    #[test]
    fn full_space_rotates_forever_with_unique_aliases() {
        // Exactly at the bound: 3·5·1... use k = 3 with 15 = 5·1·3 aliases of 4 bits.
        let mut rng = Csprng::new().unwrap();
        let mut s = AliasSchedule::new(cfg(4, 1, 3, 5)).unwrap();
        for step in 0..200u64 {
            let now = step * 1000;
            let ch = s.advance(now, &mut rng);
            assert!(ch.started.is_some(), "rotates every t_sid");
            let mut all = HashSet::new();
            for e in s.valid_epochs() {
                assert!(e.valid_until_ms > now);
                for (_, l) in &e.aliases {
                    for &a in l {
                        assert!(a != 0 && a < 16);
                        assert!(all.insert(a), "alias {a} valid twice");
                    }
                }
            }
            assert!(s.valid_epochs().count() <= 3);
        }
    }

    #[test]
    fn epoch_lives_k_t_sid_and_is_current_only_while_newest() {
        let mut rng = Csprng::new().unwrap();
        let mut s = AliasSchedule::new(cfg(16, 2, 2, 2)).unwrap();
        let e1 = s.advance(0, &mut rng).started.unwrap();
        assert_eq!((e1.epoch, e1.valid_until_ms), (1, 2000));
        assert!(s.advance(999, &mut rng).started.is_none());
        let a = s.pick(1, &mut rng).unwrap();
        assert_eq!(s.lookup(a), Some(1));
        let ch = s.advance(1000, &mut rng);
        assert_eq!(ch.started.as_ref().unwrap().epoch, 2);
        assert!(ch.expired.is_empty());
        assert_eq!(s.lookup(a), Some(1), "old alias still routes");
        let new = s.pick(1, &mut rng).unwrap();
        assert!(s.current().unwrap().aliases[0].1.contains(&new));
        let ch = s.advance(2000, &mut rng);
        assert_eq!(ch.expired, vec![1]);
        assert_eq!(s.lookup(a), None);
        assert_eq!(s.pick(9, &mut rng), None, "unknown SID");
    }

    #[test]
    fn restore_drops_expired_and_clashing_epochs() {
        let mut rng = Csprng::new().unwrap();
        let mut s = AliasSchedule::new(cfg(16, 2, 3, 2)).unwrap();
        s.advance(0, &mut rng);
        s.advance(1000, &mut rng);
        s.advance(2000, &mut rng);
        let stored: Vec<_> = s.valid_epochs().cloned().collect();
        let (r, ch) = AliasSchedule::restore(cfg(16, 2, 3, 2), stored.clone(), 3500).unwrap();
        assert_eq!(ch.expired, vec![1]);
        assert_eq!(r.valid_epochs().count(), 2);
        assert_eq!(r.next_rotation_ms(), 3000);
        let mut clash = stored[2].clone();
        clash.epoch = 9;
        let (r, ch) =
            AliasSchedule::restore(cfg(16, 2, 3, 2), vec![stored[2].clone(), clash], 2500).unwrap();
        assert_eq!(ch.expired, vec![9]);
        assert_eq!(r.valid_epochs().count(), 1);
        assert_eq!(r.next_epoch, 10);
    }

    #[test]
    fn restore_drops_epochs_that_do_not_fit_the_configuration_and_rotation_still_works() {
        let mut rng = Csprng::new().unwrap();
        // Stored under n = 5 on 4 bits (3 SIDs · 5 · 1 = 15): today n = 2, k = 2 (12 <= 15).
        let mut old = AliasSchedule::new(cfg(4, 5, 1, 3)).unwrap();
        old.advance(0, &mut rng);
        let stored: Vec<_> = old.valid_epochs().cloned().collect();
        let (mut r, ch) = AliasSchedule::restore(cfg(4, 2, 2, 3), stored, 10).unwrap();
        assert_eq!(
            ch.expired,
            vec![1],
            "an epoch with 5 aliases per SID no longer fits"
        );
        for t in 0..50u64 {
            r.advance(10 + t * 1000, &mut rng);
        }
        // A duplicated alias inside one stored epoch is refused too.
        let mut dup = r.current().unwrap().clone();
        dup.aliases[0].1[1] = dup.aliases[0].1[0];
        let (_, ch) =
            AliasSchedule::restore(cfg(4, 2, 2, 3), vec![dup.clone()], dup.start_ms).unwrap();
        assert_eq!(ch.expired, vec![dup.epoch]);
    }
}
