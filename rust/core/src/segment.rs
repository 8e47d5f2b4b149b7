//! Exact change-point segmentation of a difficulty curve into chunks of bounded length.
//!
//! Minimises Σ_chunks (within-chunk sum of squared deviations + `penalty`) over all partitions
//! whose chunk lengths lie in [min_len, max_len], by dynamic programming over prefix sums:
//! O(T · (max_len − min_len + 1)) time, O(T) memory. See docs/architecture.md §2.

/// Reusable buffers of the DP, so repeated calls allocate nothing.
#[derive(Debug, Default, Clone)]
pub struct Segmenter {
    /// Prefix sums of d and d² at the grid positions.
    s1: Vec<f64>,
    s2: Vec<f64>,
    best: Vec<f64>,
    arg: Vec<u32>,
    cost: Vec<f64>,
    /// inv_rev[i] = 1 / ((units_max − i) · g): chunk length falls as the start rises.
    inv_rev: Vec<f64>,
}

/// Chunk-length rules of one segmentation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    pub min_len: usize,
    pub max_len: usize,
    /// Boundaries fall on multiples of this many tokens (and at the end of the sequence);
    /// min_len and max_len are multiples of it.
    pub granularity: usize,
    pub penalty: f64,
}

impl Segmenter {
    /// Chunk offsets `[0, b_1, ..., T]` of the optimal segmentation of `d` (T = d.len()).
    ///
    /// Boundaries lie on multiples of `granularity` (plus T). If no partition has every length
    /// in [min_len, max_len], the last chunk may be shorter than `min_len` (architecture doc
    /// §2). Requires 1 ≤ granularity, min_len ≤ max_len, both multiples of granularity.
    pub fn segment(&mut self, d: &[f32], b: Bounds) -> Vec<usize> {
        let t_len = d.len();
        if t_len == 0 {
            return vec![0];
        }
        let g = b.granularity.max(1);
        let k_end = t_len.div_ceil(g);
        let pos = |k: usize| (k * g).min(t_len);
        self.prefix(d, g, k_end);
        let (u_min, u_max) = (b.min_len / g, b.max_len / g);
        self.inv_rev.clear();
        self.inv_rev
            .extend((0..u_max).map(|i| 1.0 / ((u_max - i) * g) as f64));
        self.best.clear();
        self.best.resize(k_end + 1, f64::INFINITY);
        self.arg.clear();
        self.arg.resize(k_end + 1, 0);
        self.best[0] = 0.0;
        for k in u_min.max(1)..k_end {
            if let Some((c, j)) =
                self.best_start_grid(k, k.saturating_sub(u_max), k - u_min, u_max, b.penalty)
            {
                self.best[k] = c;
                self.arg[k] = j as u32;
            }
        }
        // The last position is T, usually off the grid: lengths are T − j·g.
        let lo = t_len.saturating_sub(b.max_len).div_ceil(g);
        let exact = if t_len >= b.min_len {
            self.best_start_any(t_len, g, lo, (t_len - b.min_len) / g, b.penalty)
        } else {
            None
        };
        let (j_last, _) = exact
            .or_else(|| {
                // Short tail: the last chunk starts at a grid point within min_len of T.
                let lo = (t_len + 1).saturating_sub(b.min_len).div_ceil(g);
                self.best_start_any(t_len, g, lo, k_end - 1, b.penalty)
            })
            .map_or((0, 0.0), |(c, j)| (j, c));
        let mut offsets = vec![t_len];
        let mut k = j_last;
        offsets.push(pos(k));
        while k > 0 {
            k = self.arg[k] as usize;
            offsets.push(pos(k));
        }
        offsets.reverse();
        offsets
    }

    /// Total cost of a segmentation (for tests and diagnostics).
    pub fn total_cost(d: &[f32], offsets: &[usize], penalty: f64) -> f64 {
        offsets
            .windows(2)
            .map(|w| sse(&d[w[0]..w[1]]) + penalty)
            .sum()
    }

    fn prefix(&mut self, d: &[f32], g: usize, k_end: usize) {
        self.s1.clear();
        self.s2.clear();
        self.s1.reserve(k_end + 1);
        self.s2.reserve(k_end + 1);
        let (mut a, mut b) = (0.0f64, 0.0f64);
        self.s1.push(0.0);
        self.s2.push(0.0);
        for block in d.chunks(g) {
            for &x in block {
                let x = x as f64;
                a += x;
                b += x * x;
            }
            self.s1.push(a);
            self.s2.push(b);
        }
    }

    /// Best start j in [lo, hi] (grid units) for a chunk ending at grid point k < k_end:
    /// (cost, j), smallest j on ties. The window is contiguous in every array, so the cost
    /// pass has no bounds checks and vectorises.
    fn best_start_grid(
        &mut self,
        k: usize,
        lo: usize,
        hi: usize,
        u_max: usize,
        penalty: f64,
    ) -> Option<(f64, usize)> {
        if lo > hi {
            return None;
        }
        let (s1t, s2t) = (self.s1[k], self.s2[k]);
        let n = hi - lo + 1;
        let i0 = u_max + lo - k; // length of start lo is (k − lo)·g = (u_max − i0)·g
        let inv = &self.inv_rev[i0..i0 + n];
        let (best, s1, s2) = (&self.best[lo..=hi], &self.s1[lo..=hi], &self.s2[lo..=hi]);
        self.cost.clear();
        self.cost.extend(
            best.iter()
                .zip(s1)
                .zip(s2)
                .zip(inv)
                .map(|(((&f, &a), &b), &v)| {
                    let d = s1t - a;
                    f + (s2t - b) - d * d * v + penalty
                }),
        );
        argmin_first(&self.cost).map(|(c, i)| (c, lo + i))
    }

    /// Best start j in [lo, hi] (grid units) for the chunk ending at T (off-grid lengths).
    fn best_start_any(
        &mut self,
        t_len: usize,
        g: usize,
        lo: usize,
        hi: usize,
        penalty: f64,
    ) -> Option<(f64, usize)> {
        if lo > hi {
            return None;
        }
        let k_end = self.s1.len() - 1;
        let (s1t, s2t) = (self.s1[k_end], self.s2[k_end]);
        self.cost.clear();
        self.cost.extend((lo..=hi).map(|j| {
            let len = (t_len - j * g) as f64;
            let d = s1t - self.s1[j];
            self.best[j] + (s2t - self.s2[j]) - d * d / len + penalty
        }));
        argmin_first(&self.cost).map(|(c, i)| (c, lo + i))
    }
}

/// Smallest finite value and the first index holding it.
fn argmin_first(cost: &[f64]) -> Option<(f64, usize)> {
    let m = cost
        .iter()
        .fold(f64::INFINITY, |m, &c| if c < m { c } else { m });
    if !m.is_finite() {
        return None;
    }
    cost.iter().position(|&c| c == m).map(|i| (m, i))
}

/// Sum of squared deviations from the mean (two-pass, for reference checks).
pub fn sse(x: &[f32]) -> f64 {
    if x.is_empty() {
        return 0.0;
    }
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / x.len() as f64;
    x.iter().map(|&v| (v as f64 - mean).powi(2)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Brute force over every partition (2^(T-1)), same feasibility rule as the DP.
    fn brute(d: &[f32], b: Bounds) -> f64 {
        let (min_len, max_len, pen, g) = (b.min_len, b.max_len, b.penalty, b.granularity);
        let t = d.len();
        let mut best_exact = f64::INFINITY;
        let mut best_tail = f64::INFINITY;
        for mask in 0u32..(1 << (t - 1)) {
            let mut offs = vec![0];
            offs.extend((1..t).filter(|i| mask & (1 << (i - 1)) != 0));
            if offs.iter().any(|o| o % g != 0) {
                continue;
            }
            offs.push(t);
            let lens: Vec<usize> = offs.windows(2).map(|w| w[1] - w[0]).collect();
            let c = Segmenter::total_cost(d, &offs, pen);
            let (head, last) = lens.split_at(lens.len() - 1);
            if lens.iter().all(|&l| l >= min_len && l <= max_len) {
                best_exact = best_exact.min(c);
            } else if head.iter().all(|&l| l >= min_len && l <= max_len) && last[0] < min_len {
                best_tail = best_tail.min(c);
            }
        }
        if best_exact.is_finite() {
            best_exact
        } else {
            best_tail
        }
    }

    #[test]
    fn step_function_is_split_at_the_step() {
        let mut d = vec![0.1f32; 40];
        d.extend(vec![0.9f32; 40]);
        let b = Bounds {
            min_len: 8,
            max_len: 64,
            granularity: 1,
            penalty: 0.1,
        };
        assert_eq!(Segmenter::default().segment(&d, b), vec![0, 40, 80]);
        // On an 8-token grid the boundary moves to a multiple of 8.
        let b = Bounds {
            granularity: 8,
            ..b
        };
        assert_eq!(Segmenter::default().segment(&d, b), vec![0, 40, 80]);
        let mut d2 = vec![0.1f32; 37];
        d2.extend(vec![0.9f32; 43]);
        let offs = Segmenter::default().segment(&d2, b);
        // The mixed block [32, 40) costs less as its own chunk than inside either neighbour.
        assert_eq!(offs, vec![0, 32, 40, 80]);
    }

    #[test]
    fn infeasible_lengths_use_a_short_tail() {
        let d = vec![0.5f32; 35];
        let b = Bounds {
            min_len: 16,
            max_len: 17,
            granularity: 1,
            penalty: 0.0,
        };
        let offs = Segmenter::default().segment(&d, b);
        let lens: Vec<usize> = offs.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(lens.iter().sum::<usize>(), 35);
        assert!(lens[..lens.len() - 1]
            .iter()
            .all(|&l| (16..=17).contains(&l)));
        assert!(*lens.last().unwrap() < 16);
        assert_eq!(Segmenter::default().segment(&d[..3], b), vec![0, 3]);
    }

    proptest! {
        // PROPTEST_CASES (make fuzz) overrides the default 300
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(300)
        ))]
        #[test]
        fn dp_matches_brute_force(
            d in prop::collection::vec(0.0f32..1.0, 1..14),
            g in 1usize..4,
            min_units in 1usize..4,
            extra_units in 0usize..4,
            pen in 0.0f64..0.5,
        ) {
            let (min_len, max_len) = (min_units * g, (min_units + extra_units) * g);
            let b = Bounds { min_len, max_len, granularity: g, penalty: pen };
            let offs = Segmenter::default().segment(&d, b);
            prop_assert_eq!(offs[0], 0);
            prop_assert_eq!(*offs.last().unwrap(), d.len());
            prop_assert!(offs.windows(2).all(|w| w[1] > w[0]));
            let lens: Vec<usize> = offs.windows(2).map(|w| w[1] - w[0]).collect();
            prop_assert!(lens[..lens.len() - 1].iter().all(|&l| l >= min_len && l <= max_len));
            prop_assert!(*lens.last().unwrap() <= max_len);
            prop_assert!(offs[..offs.len() - 1].iter().all(|o| o % g == 0));
            let got = Segmenter::total_cost(&d, &offs, pen);
            let want = brute(&d, b);
            prop_assert!((got - want).abs() < 1e-9, "got {} want {}", got, want);
        }
    }
}
