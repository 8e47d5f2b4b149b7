//! Exact change-point segmentation of a difficulty curve into chunks of bounded length.
//!
//! Minimises Σ_chunks (within-chunk sum of squared deviations + `penalty`) over all partitions
//! whose chunk lengths lie in [min_len, max_len], by dynamic programming over prefix sums:
//! O(T · (max_len − min_len + 1)) time, O(T) memory. See docs/architecture.md §2.

/// Reusable buffers of the DP, so repeated calls allocate nothing.
#[derive(Debug, Default, Clone)]
pub struct Segmenter {
    s1: Vec<f64>,
    s2: Vec<f64>,
    best: Vec<f64>,
    arg: Vec<u32>,
    cost: Vec<f64>,
    inv_len: Vec<f64>,
}

impl Segmenter {
    /// Chunk offsets `[0, b_1, ..., T]` of the optimal segmentation of `d` (T = d.len() ≥ 1).
    ///
    /// If no partition has every length in [min_len, max_len], the last chunk may be shorter
    /// than `min_len` (see the architecture doc). Requires 1 ≤ min_len ≤ max_len.
    pub fn segment(
        &mut self,
        d: &[f32],
        min_len: usize,
        max_len: usize,
        penalty: f64,
    ) -> Vec<usize> {
        let t_len = d.len();
        if t_len == 0 {
            return vec![0];
        }
        self.prefix(d);
        self.inv_len.clear();
        self.inv_len
            .extend((0..=max_len).map(|l| if l == 0 { 0.0 } else { 1.0 / l as f64 }));
        self.best.clear();
        self.best.resize(t_len + 1, f64::INFINITY);
        self.arg.clear();
        self.arg.resize(t_len + 1, 0);
        self.best[0] = 0.0;
        for t in min_len..=t_len {
            let lo = t.saturating_sub(max_len);
            let hi = t - min_len;
            if let Some((c, s)) = self.best_start(t, lo, hi, penalty) {
                self.best[t] = c;
                self.arg[t] = s as u32;
            }
        }
        let mut t = t_len;
        let mut offsets = vec![t_len];
        if !self.best[t_len].is_finite() {
            let lo = t_len.saturating_sub(min_len - 1);
            let (_, s) = self
                .best_start(t_len, lo, t_len - 1, penalty)
                .unwrap_or((0.0, 0));
            offsets.push(s);
            t = s;
        }
        while t > 0 {
            t = self.arg[t] as usize;
            offsets.push(t);
        }
        if offsets.last() != Some(&0) {
            offsets.push(0);
        }
        offsets.reverse();
        offsets
    }

    /// Minimal total cost of a segmentation (for tests and diagnostics).
    pub fn total_cost(d: &[f32], offsets: &[usize], penalty: f64) -> f64 {
        offsets
            .windows(2)
            .map(|w| sse(&d[w[0]..w[1]]) + penalty)
            .sum()
    }

    fn prefix(&mut self, d: &[f32]) {
        self.s1.clear();
        self.s2.clear();
        self.s1.reserve(d.len() + 1);
        self.s2.reserve(d.len() + 1);
        let (mut a, mut b) = (0.0f64, 0.0f64);
        self.s1.push(0.0);
        self.s2.push(0.0);
        for &x in d {
            let x = x as f64;
            a += x;
            b += x * x;
            self.s1.push(a);
            self.s2.push(b);
        }
    }

    /// Best start s in [lo, hi] for a last chunk ending at t: (cost, s), smallest s on ties.
    fn best_start(&mut self, t: usize, lo: usize, hi: usize, penalty: f64) -> Option<(f64, usize)> {
        if lo > hi {
            return None;
        }
        let (s1t, s2t) = (self.s1[t], self.s2[t]);
        let n = hi - lo + 1;
        self.cost.clear();
        self.cost.resize(n, 0.0);
        let best = &self.best[lo..=hi];
        let s1 = &self.s1[lo..=hi];
        let s2 = &self.s2[lo..=hi];
        // Branch-free pass the compiler vectorises; argmin in a second pass.
        for i in 0..n {
            let a = s1t - s1[i];
            let inv = self.inv_len[t - lo - i];
            self.cost[i] = best[i] + (s2t - s2[i]) - a * a * inv + penalty;
        }
        let mut m = f64::INFINITY;
        let mut arg = usize::MAX;
        for (i, &c) in self.cost.iter().enumerate() {
            if c < m {
                m = c;
                arg = i;
            }
        }
        (arg != usize::MAX).then(|| (m, lo + arg))
    }
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
    fn brute(d: &[f32], min_len: usize, max_len: usize, pen: f64) -> f64 {
        let t = d.len();
        let mut best_exact = f64::INFINITY;
        let mut best_tail = f64::INFINITY;
        for mask in 0u32..(1 << (t - 1)) {
            let mut offs = vec![0];
            offs.extend((1..t).filter(|i| mask & (1 << (i - 1)) != 0));
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
        let offs = Segmenter::default().segment(&d, 8, 64, 0.1);
        assert_eq!(offs, vec![0, 40, 80]);
    }

    #[test]
    fn infeasible_lengths_use_a_short_tail() {
        let d = vec![0.5f32; 35];
        let offs = Segmenter::default().segment(&d, 16, 17, 0.0);
        let lens: Vec<usize> = offs.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(lens.iter().sum::<usize>(), 35);
        assert!(lens[..lens.len() - 1]
            .iter()
            .all(|&l| (16..=17).contains(&l)));
        assert!(*lens.last().unwrap() < 16);
        assert_eq!(
            Segmenter::default().segment(&d[..3], 16, 17, 0.0),
            vec![0, 3]
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn dp_matches_brute_force(
            d in prop::collection::vec(0.0f32..1.0, 1..13),
            min_len in 1usize..5,
            extra in 0usize..6,
            pen in 0.0f64..0.5,
        ) {
            let max_len = min_len + extra;
            let offs = Segmenter::default().segment(&d, min_len, max_len, pen);
            prop_assert_eq!(offs[0], 0);
            prop_assert_eq!(*offs.last().unwrap(), d.len());
            prop_assert!(offs.windows(2).all(|w| w[1] > w[0]));
            let lens: Vec<usize> = offs.windows(2).map(|w| w[1] - w[0]).collect();
            prop_assert!(lens[..lens.len() - 1].iter().all(|&l| l >= min_len && l <= max_len));
            prop_assert!(*lens.last().unwrap() <= max_len);
            let got = Segmenter::total_cost(&d, &offs, pen);
            let want = brute(&d, min_len, max_len, pen);
            prop_assert!((got - want).abs() < 1e-9, "got {} want {}", got, want);
        }
    }
}
