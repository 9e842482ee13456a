//! Synthetic websites for the closed-world fingerprinting experiment, deterministic from a seed.
//!
//! A site is a page: an HTML document followed by the objects it references, each a byte size.
//! The testbed fetches a visit's objects through the tunnel; the attacker sees only the packets.
//! The accuracy a fingerprinting attack reaches depends on these distributions, so they are
//! fixed here (1 KB = 1000 bytes):
//!
//! - objects per page: the HTML document plus a number of other objects drawn uniformly from
//!   `2..=24` (so 3 to 25 objects);
//! - the HTML document: log-uniform in 4–60 KB;
//! - every other object: log-normal with median 6 KB and σ = 1.0 (Box–Muller), clipped to
//!   150 B..=200 KB;
//! - the page is capped at 1.2 MB: the first object that would take the total past the cap is
//!   dropped, and so is every object after it (the HTML document always fits).
//!
//! A visit ([`Site::visit`]) varies the page the way repeated loads of one real page vary:
//!
//! - every object's size is multiplied by a factor uniform in `[0.97, 1.03]` (rounded, at
//!   least 1 byte): dynamic content, headers, compression;
//! - every object but the HTML document is skipped with probability 0.05 (an ad not served, an
//!   object already cached);
//! - the HTML document comes first; the other objects keep page order except that one
//!   left-to-right pass swaps each adjacent pair with probability 0.2 (parallel fetches
//!   finishing in a different order).
//!
//! Site `i` of a seed is the same whatever `count` is asked for, and a visit depends only on
//! the site and the visit seed.

use mimiq_agent::rng::{HopRng, Seed};

/// Other objects per page, besides the HTML document.
const OTHER_OBJECTS: (u64, u64) = (2, 24);
/// Bounds of the HTML document's size, in bytes (log-uniform between them).
const HTML_BYTES: (f64, f64) = (4_000.0, 60_000.0);
/// Median of the other objects' log-normal size, in bytes.
const OBJECT_MEDIAN_BYTES: f64 = 6_000.0;
/// σ of the logarithm of the other objects' size.
const OBJECT_SIGMA: f64 = 1.0;
/// Clip of the other objects' size, in bytes.
const OBJECT_BYTES: (f64, f64) = (150.0, 200_000.0);
/// Cap on a page's total size, in bytes.
pub const PAGE_CAP_BYTES: u64 = 1_200_000;
/// Bounds of a visit's per-object size factor.
pub const VISIT_FACTOR: (f64, f64) = (0.97, 1.03);
/// Probability that a visit skips one of the page's non-HTML objects.
pub const SKIP_PROBABILITY: f64 = 0.05;
/// Probability that a visit swaps an adjacent pair of non-HTML objects.
pub const SWAP_PROBABILITY: f64 = 0.2;

/// One synthetic website.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Site {
    /// The site's index among those generated from one seed (the class label).
    pub id: u32,
    /// Object sizes in bytes, in page order; `objects[0]` is the HTML document.
    pub objects: Vec<u32>,
}

/// `count` sites generated from `seed`, with ids `0..count` (saturating at `u32::MAX`).
pub fn generate(seed: u64, count: usize) -> Vec<Site> {
    (0..count)
        .map(|i| {
            let id = u32::try_from(i).unwrap_or(u32::MAX);
            let mut rng = HopRng::new(Seed::experiment(seed).derive(u64::from(id)));
            Site {
                id,
                objects: page(&mut rng),
            }
        })
        .collect()
}

impl Site {
    /// The object sizes one visit fetches, in fetch order (see the module doc for how visits
    /// vary). The same `seed` gives the same visit; a site without objects gives none.
    pub fn visit(&self, seed: u64) -> Vec<u32> {
        let mut rng = HopRng::new(Seed::experiment(seed).derive(u64::from(self.id)));
        let Some((&html, others)) = self.objects.split_first() else {
            return Vec::new();
        };
        let mut fetched = vec![vary(html, &mut rng)];
        let first_other = fetched.len();
        for &size in others {
            if rng.unit() >= SKIP_PROBABILITY {
                fetched.push(vary(size, &mut rng));
            }
        }
        for i in first_other..fetched.len().saturating_sub(1) {
            if rng.unit() < SWAP_PROBABILITY {
                fetched.swap(i, i + 1);
            }
        }
        fetched
    }

    /// The page's total size in bytes.
    pub fn bytes(&self) -> u64 {
        self.objects.iter().map(|&s| u64::from(s)).sum()
    }
}

/// One page's object sizes: the HTML document, then the other objects up to the cap.
fn page(rng: &mut HopRng) -> Vec<u32> {
    let others = rng.range_inclusive(OTHER_OBJECTS.0, OTHER_OBJECTS.1);
    let (lo, hi) = HTML_BYTES;
    let html = (lo.ln() + rng.unit() * (hi / lo).ln()).exp();
    let mut objects = vec![html.round() as u32];
    let mut total = u64::from(objects[0]);
    for _ in 0..others {
        let size = (OBJECT_MEDIAN_BYTES.ln() + OBJECT_SIGMA * standard_normal(rng)).exp();
        let size = size.clamp(OBJECT_BYTES.0, OBJECT_BYTES.1).round() as u32;
        total += u64::from(size);
        if total > PAGE_CAP_BYTES {
            break;
        }
        objects.push(size);
    }
    objects
}

/// A standard normal draw (Box–Muller).
fn standard_normal(rng: &mut HopRng) -> f64 {
    // 1 - unit is in (0, 1], so the logarithm is finite.
    let radius = (-2.0 * (1.0 - rng.unit()).ln()).sqrt();
    radius * (std::f64::consts::TAU * rng.unit()).cos()
}

/// `size` scaled by a visit's random factor, at least 1 byte.
fn vary(size: u32, rng: &mut HopRng) -> u32 {
    let (lo, hi) = VISIT_FACTOR;
    let factor = lo + (hi - lo) * rng.unit();
    (f64::from(size) * factor).round().max(1.0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_sites_and_visits() {
        let a = generate(7, 20);
        assert_eq!(a, generate(7, 20));
        assert_eq!(
            a[..5],
            generate(7, 5)[..],
            "site i must not depend on count"
        );
        assert_ne!(a, generate(8, 20));
        for site in &a {
            assert_eq!(site.visit(3), site.visit(3));
        }
        assert!(a.iter().any(|s| s.visit(3) != s.visit(4)));
    }

    #[test]
    fn sites_differ() {
        let sites = generate(1, 200);
        for (i, a) in sites.iter().enumerate() {
            assert_eq!(a.id as usize, i);
            for b in &sites[i + 1..] {
                assert_ne!(a.objects, b.objects, "sites {} and {}", a.id, b.id);
            }
        }
    }

    #[test]
    fn pages_stay_within_the_stated_bounds_and_cap() {
        let sites = generate(2, 2_000);
        let mut capped = 0;
        for site in &sites {
            let html = f64::from(site.objects[0]);
            assert!((HTML_BYTES.0..=HTML_BYTES.1).contains(&html), "{html}");
            assert!(site.objects.len() <= 1 + OTHER_OBJECTS.1 as usize);
            for &size in &site.objects[1..] {
                assert!((OBJECT_BYTES.0..=OBJECT_BYTES.1).contains(&f64::from(size)));
            }
            assert!(site.bytes() <= PAGE_CAP_BYTES);
            if site.objects.len() < 1 + OTHER_OBJECTS.0 as usize {
                capped += 1;
            }
        }
        // Pages shorter than the minimum object count exist only through the cap, which is rare.
        assert!(capped < sites.len() / 100, "{capped}");
        // The log-normal's median is 6 KB.
        let mut others: Vec<u32> = sites.iter().flat_map(|s| s.objects[1..].to_vec()).collect();
        others.sort_unstable();
        let median = f64::from(others[others.len() / 2]);
        assert!((5_500.0..=6_500.0).contains(&median), "{median}");
    }

    #[test]
    fn visits_vary_within_the_stated_bounds() {
        let sites = generate(3, 50);
        let (mut kept, mut offered) = (0usize, 0usize);
        for site in &sites {
            for seed in 0..40 {
                let visit = site.visit(seed);
                let within = |orig: u32, seen: u32| {
                    let orig = f64::from(orig);
                    let seen = f64::from(seen);
                    seen >= (orig * VISIT_FACTOR.0).floor().max(1.0)
                        && seen <= (orig * VISIT_FACTOR.1).ceil()
                };
                assert!(within(site.objects[0], visit[0]), "HTML document first");
                assert!(visit.len() <= site.objects.len());
                // Each fetched object matches a distinct page object within the size factor.
                // The intervals grow with the size, so matching both sides in ascending order,
                // each fetched object to the smallest page object that still fits, is exact.
                let mut page = site.objects[1..].to_vec();
                let mut fetched = visit[1..].to_vec();
                page.sort_unstable();
                fetched.sort_unstable();
                let mut candidates = page.iter().peekable();
                for &seen in &fetched {
                    while candidates
                        .next_if(|&&orig| !within(orig, seen) && f64::from(orig) < f64::from(seen))
                        .is_some()
                    {}
                    let matched = candidates.next_if(|&&orig| within(orig, seen));
                    assert!(
                        matched.is_some(),
                        "site {} visit {seed}: {seen} matches nothing",
                        site.id
                    );
                }
                kept += visit.len() - 1;
                offered += site.objects.len() - 1;
            }
        }
        let skipped = 1.0 - kept as f64 / offered as f64;
        assert!((0.03..=0.07).contains(&skipped), "{skipped}");
    }
}
