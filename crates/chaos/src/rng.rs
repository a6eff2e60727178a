//! A small seeded generator (SplitMix64) for picking devices and kill times. Not for
//! cryptography; a printed seed lets a campaign's random choices be repeated (the timing of a
//! concurrent run cannot be).

/// SplitMix64 (Steele, Lea and Flood): one 64-bit state, a Weyl step and a mix.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    /// A seed from the operating system, or from the clock if that fails.
    pub fn fresh_seed() -> u64 {
        getrandom::u64().unwrap_or_else(|_| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x5eed)
        })
    }

    /// An independent generator for stream `n` of this seed (one per task).
    pub fn fork(&self, n: u64) -> Rng {
        let mut mixed = Rng::new(self.state ^ n.wrapping_mul(0xd134_2543_de82_ef95));
        Rng::new(mixed.next_u64())
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        // The modulo bias is below 2^-40 for the sizes used here.
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// Uniform in `[low, high)`.
    pub fn between(&mut self, low: f64, high: f64) -> f64 {
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        low + (high - low) * unit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_numbers_and_ranges_hold() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let mut r = Rng::new(1);
        for _ in 0..10_000 {
            assert!(r.below(50) < 50);
            let x = r.between(1.0, 5.0);
            assert!((1.0..5.0).contains(&x), "{x}");
        }
        assert_ne!(
            Rng::new(3).fork(1).next_u64(),
            Rng::new(3).fork(2).next_u64()
        );
    }
}
