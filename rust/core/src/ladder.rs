//! From chunk difficulty to rung: threshold, quantile and target-mean-rank modes, and the
//! per-sequence budget on high rungs. Every mode resolves to thresholds θ and
//! `rung = #{j : D > θ_j}`, so a harder chunk never gets a lower rung.

use crate::config::{RungMode, SchedulerConfig};

/// A chunk as the ladder sees it: mean difficulty and length in tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChunkStat {
    pub difficulty: f64,
    pub len: usize,
}

/// Rung index of difficulty `d` under sorted thresholds (strict comparison).
pub fn rung_of(d: f64, thresholds: &[f64]) -> usize {
    thresholds.iter().filter(|&&t| d > t).count()
}

/// The thresholds every chunk of a plan is ranked with, resolved per the config's mode.
pub fn resolve_thresholds(cfg: &SchedulerConfig, chunks: &[ChunkStat]) -> Vec<f64> {
    match &cfg.mode {
        RungMode::Threshold => cfg.thresholds.clone(),
        RungMode::Quantile(q) => quantile_thresholds(q, chunks),
        RungMode::Target(target) => target_thresholds(cfg, *target, chunks),
    }
}

fn sorted_by_difficulty(chunks: &[ChunkStat]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..chunks.len()).collect();
    order.sort_by(|&a, &b| {
        chunks[a]
            .difficulty
            .total_cmp(&chunks[b].difficulty)
            .then(a.cmp(&b))
    });
    order
}

/// θ_j = difficulty of the last chunk (sorted by difficulty) whose token midpoint lies at or
/// below the quantile q_j·N, so each rung gets the chunks whose middle falls in its share.
fn quantile_thresholds(q: &[f64], chunks: &[ChunkStat]) -> Vec<f64> {
    let order = sorted_by_difficulty(chunks);
    let total: usize = chunks.iter().map(|c| c.len).sum();
    let mut mids = Vec::with_capacity(order.len());
    let mut before = 0usize;
    for &i in &order {
        mids.push(before as f64 + chunks[i].len as f64 / 2.0);
        before += chunks[i].len;
    }
    let lowest = order.first().map_or(0.0, |&i| chunks[i].difficulty);
    q.iter()
        .map(|&qj| {
            let k = mids.partition_point(|&m| m <= qj * total as f64);
            if k == 0 {
                lowest - 1.0
            } else {
                chunks[order[k - 1]].difficulty
            }
        })
        .collect()
}

fn mean_rank(cfg: &SchedulerConfig, thresholds: &[f64], chunks: &[ChunkStat]) -> f64 {
    let total: usize = chunks.iter().map(|c| c.len).sum();
    let sum: f64 = chunks
        .iter()
        .map(|c| cfg.rungs[rung_of(c.difficulty, thresholds)] as f64 * c.len as f64)
        .sum();
    sum / total.max(1) as f64
}

fn target_thresholds(cfg: &SchedulerConfig, target: f64, chunks: &[ChunkStat]) -> Vec<f64> {
    let base = &cfg.thresholds;
    let shifted = |delta: f64| -> Vec<f64> { base.iter().map(|t| t + delta).collect() };
    let mut cands: Vec<f64> = chunks
        .iter()
        .flat_map(|c| base.iter().map(move |t| c.difficulty - t))
        .collect();
    let lowest = cands.iter().copied().fold(f64::INFINITY, f64::min);
    let highest = cands.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !lowest.is_finite() {
        return base.clone();
    }
    // Sentinels well clear of rounding: every chunk on the top rung / every chunk on rung 0.
    cands.push(lowest - 1.0);
    cands.push(highest + 1.0);
    cands.sort_by(f64::total_cmp);
    cands.dedup();
    // M(δ) is non-increasing in δ and M(highest + 1) = rank of rung 0 <= target.
    let (mut lo, mut hi) = (0usize, cands.len() - 1);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if mean_rank(cfg, &shifted(cands[mid]), chunks) <= target {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    shifted(cands[lo])
}

/// Demotes the easiest high chunks of one sequence until tokens on rungs with rank
/// ≥ `budget_rank` are at most `budget_share` of the sequence.
pub fn apply_budget(cfg: &SchedulerConfig, chunks: &[ChunkStat], rungs: &mut [usize]) {
    let h = cfg.budget_rung();
    if h == 0 || cfg.budget_share >= 1.0 {
        return;
    }
    let total: usize = chunks.iter().map(|c| c.len).sum();
    let cap = cfg.budget_share * total as f64;
    let mut high: usize = chunks
        .iter()
        .zip(rungs.iter())
        .filter(|(_, &r)| r >= h)
        .map(|(c, _)| c.len)
        .sum();
    if high as f64 <= cap {
        return;
    }
    for i in sorted_by_difficulty(chunks) {
        if high as f64 <= cap {
            break;
        }
        if rungs[i] >= h {
            rungs[i] = h - 1;
            high -= chunks[i].len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(ds: &[f64]) -> Vec<ChunkStat> {
        ds.iter()
            .map(|&d| ChunkStat {
                difficulty: d,
                len: 10,
            })
            .collect()
    }

    #[test]
    fn quantiles_split_tokens() {
        let mut cfg = SchedulerConfig::with_rungs(vec![0, 8]);
        cfg.mode = RungMode::Quantile(vec![0.5]);
        let ch = stats(&[0.9, 0.1, 0.5, 0.3]);
        let th = resolve_thresholds(&cfg, &ch);
        let r: Vec<usize> = ch.iter().map(|c| rung_of(c.difficulty, &th)).collect();
        assert_eq!(r, vec![1, 0, 1, 0]);
        // Six rungs, six equal chunks: one chunk per rung, the top rung included.
        let mut cfg = SchedulerConfig::with_rungs(vec![0, 4, 8, 16, 32, 64]);
        cfg.mode = RungMode::Quantile(crate::config::default_cuts(6));
        let ch = stats(&[0.6, 0.1, 0.5, 0.3, 0.2, 0.4]);
        let th = resolve_thresholds(&cfg, &ch);
        let r: Vec<usize> = ch.iter().map(|c| rung_of(c.difficulty, &th)).collect();
        assert_eq!(r, vec![5, 0, 4, 2, 1, 3]);
    }

    #[test]
    fn target_mean_rank_is_met_from_below() {
        let mut cfg = SchedulerConfig::with_rungs(vec![0, 4, 8, 16]);
        let ch = stats(&[0.05, 0.2, 0.4, 0.6, 0.8, 0.95]);
        for target in [0.0, 3.0, 8.0, 11.0, 16.0] {
            cfg.mode = RungMode::Target(target);
            let th = resolve_thresholds(&cfg, &ch);
            let m = mean_rank(&cfg, &th, &ch);
            assert!(m <= target + 1e-12, "target {target} got {m}");
        }
        cfg.mode = RungMode::Target(16.0);
        let th = resolve_thresholds(&cfg, &ch);
        assert_eq!(mean_rank(&cfg, &th, &ch), 16.0);
    }

    #[test]
    fn budget_demotes_easiest_high_chunks() {
        let mut cfg = SchedulerConfig::with_rungs(vec![0, 4, 8]);
        cfg.budget_share = 0.25;
        let ch = stats(&[0.9, 0.8, 0.95, 0.1]);
        let mut r = vec![2, 2, 2, 0];
        apply_budget(&cfg, &ch, &mut r);
        assert_eq!(r, vec![1, 1, 2, 0]);
    }
}
