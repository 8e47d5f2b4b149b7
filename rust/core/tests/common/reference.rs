//! Reference computations straight from the spec (docs/architecture.md §1–4), independent of
//! the core's implementation, and a one-sequence planning helper.

use super::plan_gen::Batch;
use chunkwise_core::difficulty::SignalArrays;
use chunkwise_core::{Plan, PlanInput, Planner, SchedulerConfig};

pub fn rung_of(d: f64, th: &[f64]) -> usize {
    th.iter().filter(|&&t| d > t).count()
}

/// Mean difficulty of every chunk, summed in f64 in token order (as the spec defines D_c).
pub fn chunk_means(p: &Plan) -> Vec<f64> {
    p.chunk_offsets
        .windows(2)
        .map(|w| {
            let s: f64 = p.difficulty[w[0] as usize..w[1] as usize]
                .iter()
                .map(|&x| x as f64)
                .sum();
            s / (w[1] - w[0]) as f64
        })
        .collect()
}

/// Some partition of `t` into lengths all in [lo, hi] exists.
pub fn exact_split(t: usize, lo: usize, hi: usize) -> bool {
    t.div_ceil(hi) <= t / lo
}

/// Some partition of `t` with inner boundaries on multiples of `g` (lo, hi multiples of `g`)
/// has every length in [lo, hi].
pub fn exact_split_on_grid(t: usize, lo: usize, hi: usize, g: usize) -> bool {
    (0..=t / g).any(|j| (j == 0 || exact_split(j * g, lo, hi)) && (lo..=hi).contains(&(t - j * g)))
}

/// The §2 length rule: every chunk in [lo, hi], except that the last one is in [1, lo) when
/// (and only when) the sequence admits no exact split.
pub fn lengths_ok(lens: &[usize], feasible: bool, lo: usize, hi: usize) -> bool {
    let (last, head) = lens.split_last().unwrap();
    head.iter().all(|l| (lo..=hi).contains(l))
        && if feasible {
            (lo..=hi).contains(last)
        } else {
            (1..lo).contains(last)
        }
}

/// Harder (strictly larger D) never gets a lower rung, over the chunks `idx`.
pub fn monotone(d: &[f64], rung: &[i32], idx: &[usize]) -> bool {
    let mut order = idx.to_vec();
    order.sort_by(|&a, &b| d[a].total_cmp(&d[b]));
    let (mut i, mut below) = (0, i32::MIN);
    while i < order.len() {
        let j = (i..order.len())
            .find(|&j| d[order[j]] != d[order[i]])
            .unwrap_or(order.len());
        let group = order[i..j].iter().map(|&c| rung[c]);
        if group.clone().min().unwrap() < below {
            return false;
        }
        below = below.max(group.max().unwrap());
        i = j;
    }
    true
}

/// Token-weighted mean rank of the chunks under thresholds `th` (no budget).
pub fn mean_rank(cfg: &SchedulerConfig, d: &[f64], lens: &[usize], th: &[f64]) -> f64 {
    let n: usize = lens.iter().sum();
    let s: f64 = (0..d.len())
        .map(|c| cfg.rungs[rung_of(d[c], th)] as f64 * lens[c] as f64)
        .sum();
    s / n as f64
}

/// The §4 cross-fade from rank `a` to rank `b` at token `i` of the new chunk (i < crossfade):
/// the expected (gate_lo, gate_hi).
pub fn ramp_gates(cfg: &SchedulerConfig, a: i32, b: i32, i: usize) -> (f64, f64) {
    let al = (i + 1) as f64 / (cfg.crossfade + 1) as f64;
    let sc = |r: i32| cfg.scale_of_rank(r as u32);
    let smax = sc(a.max(b));
    let want_lo = if smax > 0.0 {
        ((1.0 - al) * sc(a) + al * sc(b)) / smax
    } else {
        0.0
    };
    let want_hi = if b > a { al } else { 1.0 - al };
    (want_lo, want_hi)
}

/// Checks token `i` of a ramp from rank `a` to `b` against §4: it runs at the larger rank, the
/// band starts at the smaller one, and its gates follow [`ramp_gates`]. `at` labels the token.
pub fn check_ramp_token(
    cfg: &SchedulerConfig,
    (a, b, i): (i32, i32, usize),
    (rank, lo, glo, ghi): (i32, i32, f32, f32),
    at: &str,
) -> Result<(), proptest::test_runner::TestCaseError> {
    let (want_lo, want_hi) = ramp_gates(cfg, a, b, i);
    proptest::prop_assert_eq!((rank, lo), (a.max(b), a.min(b)), "ramp {}", at);
    proptest::prop_assert!(
        (glo as f64 - want_lo).abs() <= 1e-6 * want_lo.max(1.0)
            && (ghi as f64 - want_hi).abs() < 1e-6,
        "gates {} {} vs {} {} at {}",
        glo,
        ghi,
        want_lo,
        want_hi,
        at
    );
    Ok(())
}

/// Reference difficulty of §1, straight from the formulas (novelty by brute force).
pub fn reference_difficulty(cfg: &SchedulerConfig, b: &Batch) -> Vec<f64> {
    let w = &cfg.weights;
    let rarity = b.counts.as_ref().map(|c| {
        let tot: f64 = c.iter().sum::<f64>() + c.len() as f64;
        let s: Vec<f64> = c.iter().map(|x| -((x + 1.0) / tot).ln()).collect();
        let (lo, hi) = s
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, z), &v| (a.min(v), z.max(v)));
        s.iter()
            .map(|v| if hi > lo { (v - lo) / (hi - lo) } else { 0.0 })
            .collect::<Vec<f64>>()
    });
    let so = b.offsets();
    let mut out = Vec::new();
    for s in 0..b.lens.len() {
        let ids = &b.ids[so[s]..so[s + 1]];
        let gram = |t: usize| &ids[(t + 1).saturating_sub(cfg.ngram)..=t];
        let mut prev: Option<f64> = None;
        for (p, t) in (so[s]..so[s + 1]).enumerate() {
            let novel = !(p.saturating_sub(cfg.novelty_window)..p).any(|u| gram(u) == gram(p));
            let mut terms = vec![
                (w.novelty, Some(if novel { 1.0 } else { 0.0 })),
                (w.position, Some((-(p as f64) / cfg.position_tau).exp())),
                (w.rarity, rarity.as_ref().map(|r| r[ids[p] as usize])),
            ];
            let at = |a: &Option<Vec<f32>>| a.as_ref().map(|v| v[t] as f64);
            terms.push((w.entropy, at(&b.entropy)));
            terms.push((w.surprisal, at(&b.surprisal)));
            terms.push((w.probe, at(&b.probe).map(|x| x / (x + cfg.probe_scale))));
            let (num, den) = terms
                .iter()
                .filter_map(|&(wt, v)| v.filter(|_| wt > 0.0).map(|v| (wt * v, wt)))
                .fold((0.0, 0.0), |(a, z), (x, y)| (a + x, z + y));
            let raw = if den > 0.0 { num / den } else { 0.0 };
            let dd = prev.map_or(raw, |q| cfg.ema * raw + (1.0 - cfg.ema) * q);
            prev = Some(dd);
            out.push(dd.clamp(0.0, 1.0));
        }
    }
    out
}

/// Plans one sequence with the given per-token difficulty (ids all 1, no signals).
pub fn plan_difficulty(cfg: SchedulerConfig, d: &[f32]) -> chunkwise_core::Result<Plan> {
    let ids = vec![1i64; d.len()];
    let lens = [d.len()];
    let input = PlanInput {
        token_ids: &ids,
        seq_lengths: &lens,
        signals: SignalArrays::default(),
        difficulty: Some(d),
        adapters: None,
    };
    Planner::new(cfg, None)?.plan(&input)
}
