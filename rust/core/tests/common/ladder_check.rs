//! The §3 part of the prefill plan checker (docs/architecture.md §3): chunk difficulties and
//! ranks, the thresholds of each rung mode (threshold, quantile, target mean rank), the
//! per-sequence budget on high rungs, and monotonicity.

use super::budget_rung;
use super::plan_check::Layout;
use super::plan_gen::Batch;
use super::reference::{chunk_means, mean_rank, monotone, rung_of};
use chunkwise_core::{Plan, RungMode, SchedulerConfig};
use proptest::prelude::*;

/// §3 rungs: chunk D and ranks, and the thresholds the rung mode must produce. Returns the
/// chunk means and each chunk's rung before the budget.
pub fn check_rungs(
    cfg: &SchedulerConfig,
    p: &Plan,
    lay: &Layout,
) -> Result<(Vec<f64>, Vec<usize>), TestCaseError> {
    let (n, clen) = (lay.n, &lay.clen);
    let (m, nc) = (cfg.n_rungs(), clen.len());
    let d = chunk_means(p);
    for (c, &dc) in d.iter().enumerate() {
        prop_assert!((p.chunk_difficulty[c] as f64 - dc).abs() <= 1e-6);
        prop_assert_eq!(p.chunk_rank[c], cfg.rungs[p.chunk_rung[c] as usize] as i32);
    }
    let th = &p.thresholds;
    prop_assert_eq!(th.len(), m - 1);
    prop_assert!(th.iter().all(|t| t.is_finite()) && th.windows(2).all(|w| w[0] <= w[1]));
    let pre: Vec<usize> = d.iter().map(|&x| rung_of(x, th)).collect();
    let all: Vec<usize> = (0..nc).collect();
    let pre_i: Vec<i32> = pre.iter().map(|&r| r as i32).collect();
    prop_assert!(monotone(&d, &pre_i, &all));
    match &cfg.mode {
        RungMode::Threshold => prop_assert_eq!(th, &cfg.thresholds),
        RungMode::Quantile(q) => {
            // θ_j = D of the last chunk, sorted by (D, index), whose token midpoint is at or
            // below q_j·N (D_min − 1 if none).
            let mut order = all.clone();
            order.sort_by(|&a, &b| d[a].total_cmp(&d[b]).then(a.cmp(&b)));
            let mut before = 0usize;
            let mids: Vec<f64> = order
                .iter()
                .map(|&c| {
                    before += clen[c];
                    (before - clen[c]) as f64 + clen[c] as f64 / 2.0
                })
                .collect();
            for (j, &qj) in q.iter().enumerate() {
                let last = (0..order.len()).rev().find(|&k| mids[k] <= qj * n as f64);
                let want = last.map_or(d[order[0]] - 1.0, |k| d[order[k]]);
                prop_assert_eq!(th[j], want, "quantile {}", qj);
            }
        }
        RungMode::Target(target) => {
            // δ* is the smallest candidate meeting the target: the previous one misses it.
            let base = &cfg.thresholds;
            let mut cands: Vec<f64> = d
                .iter()
                .flat_map(|x| base.iter().map(move |t| x - t))
                .collect();
            let lowest = cands.iter().copied().fold(f64::INFINITY, f64::min);
            let highest = cands.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            cands.push(lowest - 1.0);
            cands.push(highest + 1.0);
            cands.sort_by(f64::total_cmp);
            cands.dedup();
            let shifted = |x: f64| base.iter().map(|t| t + x).collect::<Vec<f64>>();
            let meets = |th: &[f64]| mean_rank(cfg, &d, clen, th) <= target + 1e-9;
            let largest = cands[cands.len() - 1];
            match cands.iter().position(|&x| &shifted(x) == th) {
                Some(i) => {
                    let got = mean_rank(cfg, &d, clen, th);
                    prop_assert!(meets(th), "mean rank {} > target {}", got, target);
                    if i > 0 {
                        prop_assert!(
                            !meets(&shifted(cands[i - 1])),
                            "a smaller shift meets the target"
                        );
                    }
                }
                // Beyond every candidate (e.g. a fixed core's sentinel): only to reach rung 0.
                None => {
                    prop_assert!(
                        pre.iter().all(|&r| r == 0),
                        "thresholds {:?} are not θ⁰ + a candidate",
                        th
                    );
                    prop_assert!(!meets(&shifted(largest)));
                }
            }
            if *target >= cfg.rungs[m - 1] as f64 {
                prop_assert!(pre.iter().all(|&r| r == m - 1));
            }
        }
    }
    Ok((d, pre))
}

/// Budget (per sequence) and monotonicity within each sequence. `d`: chunk means; `pre`: each
/// chunk's rung before the budget.
pub fn check_budget(
    cfg: &SchedulerConfig,
    b: &Batch,
    p: &Plan,
    lay: &Layout,
    d: &[f64],
    pre: &[usize],
) -> Result<(), TestCaseError> {
    let (clen, by_seq) = (&lay.clen, &lay.by_seq);
    let h = budget_rung(cfg);
    for (s, chunks) in by_seq.iter().enumerate() {
        prop_assert!(monotone(d, &p.chunk_rung, chunks));
        if cfg.budget_share >= 1.0 {
            prop_assert!(chunks.iter().all(|&c| p.chunk_rung[c] as usize == pre[c]));
            continue;
        }
        let cap = cfg.budget_share * b.lens[s] as f64;
        let high: usize = chunks
            .iter()
            .filter(|&&c| p.chunk_rung[c] as usize >= h)
            .map(|&c| clen[c])
            .sum();
        prop_assert!(
            high as f64 <= cap + 1e-9,
            "seq {}: {} high tokens > {}",
            s,
            high,
            cap
        );
        let key = |c: usize| (d[c], c);
        let lt = |a: (f64, usize), b: (f64, usize)| a.0 < b.0 || (a.0 == b.0 && a.1 < b.1);
        let mut demoted = vec![];
        for &c in chunks {
            let r = p.chunk_rung[c] as usize;
            prop_assert!(
                r == pre[c] || (pre[c] >= h && r == h - 1),
                "chunk {}: {} vs {}",
                c,
                r,
                pre[c]
            );
            if r != pre[c] {
                demoted.push(c);
            }
        }
        if let Some(&top) = demoted
            .iter()
            .max_by(|&&a, &&b| d[a].total_cmp(&d[b]).then(a.cmp(&b)))
        {
            prop_assert!(
                high as f64 + clen[top] as f64 > cap,
                "demoted more than needed"
            );
            for &c in chunks {
                if p.chunk_rung[c] as usize >= h {
                    prop_assert!(lt(key(top), key(c)), "a harder chunk was demoted first");
                }
            }
        }
    }
    Ok(())
}
