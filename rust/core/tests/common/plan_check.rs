//! The prefill plan checker: every invariant of docs/architecture.md §2–4 that a plan must
//! satisfy, against reference computations. The §3 ladder checks are in ladder_check.rs.

use super::equal_scales;
use super::ladder_check::{check_budget, check_rungs};
use super::plan_gen::Batch;
use super::reference::{check_ramp_token, exact_split_on_grid, lengths_ok};
use chunkwise_core::segment::sse;
use chunkwise_core::{Plan, SchedulerConfig};
use proptest::prelude::*;

/// Where the tokens and chunks of a checked plan lie.
pub struct Layout {
    /// Sequence offsets, from the batch.
    pub so: Vec<usize>,
    /// Tokens in the batch.
    pub n: usize,
    /// Chunk offsets.
    pub co: Vec<usize>,
    /// Chunk lengths.
    pub clen: Vec<usize>,
    /// The chunks of each sequence.
    pub by_seq: Vec<Vec<usize>>,
}

/// Every invariant of §2–4 that a plan must satisfy, checked against reference computations.
pub fn check_plan(cfg: &SchedulerConfig, b: &Batch, p: &Plan) -> Result<(), TestCaseError> {
    let so = b.offsets();
    let n = so[so.len() - 1];
    prop_assert_eq!(
        &p.seq_offsets,
        &so.iter().map(|&o| o as i32).collect::<Vec<_>>()
    );
    prop_assert_eq!(p.difficulty.len(), n);
    prop_assert!(p.difficulty.iter().all(|d| (0.0..=1.0).contains(d)));
    if let Some(d) = &b.difficulty {
        prop_assert_eq!(&p.difficulty, d);
    }
    let lay = check_chunks(cfg, b, p, so, n)?;
    let (d, pre) = check_rungs(cfg, p, &lay)?;
    check_budget(cfg, b, p, &lay, &d, &pre)?;
    check_gates(cfg, p, &lay)?;
    check_segments(cfg, b, p, &lay)
}

/// §2 chunks: cover, stay inside sequences, lengths in [min_len, max_len] except the rule, and
/// the DP's split is locally optimal.
fn check_chunks(
    cfg: &SchedulerConfig,
    b: &Batch,
    p: &Plan,
    so: Vec<usize>,
    n: usize,
) -> Result<Layout, TestCaseError> {
    let nc = p.chunk_offsets.len() - 1;
    prop_assert_eq!((p.chunk_offsets[0], p.chunk_offsets[nc]), (0, n as i32));
    prop_assert!(p.chunk_offsets.windows(2).all(|w| w[0] < w[1]));
    for v in [&p.chunk_seq, &p.chunk_rung, &p.chunk_rank] {
        prop_assert_eq!(v.len(), nc);
    }
    prop_assert_eq!(p.chunk_difficulty.len(), nc);
    let co: Vec<usize> = p.chunk_offsets.iter().map(|&o| o as usize).collect();
    let clen: Vec<usize> = co.windows(2).map(|w| w[1] - w[0]).collect();
    let mut by_seq: Vec<Vec<usize>> = vec![vec![]; b.lens.len()];
    for c in 0..nc {
        let s = p.chunk_seq[c] as usize;
        prop_assert!(s < b.lens.len() && so[s] <= co[c] && co[c + 1] <= so[s + 1]);
        by_seq[s].push(c);
    }
    let (lo, hi, g) = (cfg.min_len, cfg.max_len, cfg.granularity);
    for (s, chunks) in by_seq.iter().enumerate() {
        let t = b.lens[s];
        prop_assert!(!chunks.is_empty());
        prop_assert!(chunks.windows(2).all(|w| w[1] == w[0] + 1));
        prop_assert_eq!(co[chunks[0]], so[s]);
        let starts: Vec<usize> = chunks.iter().map(|&c| co[c] - so[s]).collect();
        prop_assert!(
            starts.iter().all(|x| x % g == 0),
            "off-grid starts {:?}",
            starts
        );
        let lens: Vec<usize> = chunks.iter().map(|&c| clen[c]).collect();
        let feasible = exact_split_on_grid(t, lo, hi, g);
        prop_assert!(
            lengths_ok(&lens, feasible, lo, hi),
            "T={} g={} lens {:?}",
            t,
            g,
            lens
        );
        // Local optimality of the DP: moving one boundary by ±g or removing it (keeping the
        // length rule) never lowers the cost.
        let d = &p.difficulty[so[s]..so[s + 1]];
        let at = |i: usize| starts.get(i).copied().unwrap_or(t);
        for i in 1..lens.len() {
            let (a, mid, e) = (at(i - 1), at(i), at(i + 1));
            let old = sse(&d[a..mid]) + sse(&d[mid..e]);
            let mut alts = vec![];
            for m2 in [mid.wrapping_sub(g), mid + g] {
                if m2 > a && m2 < e {
                    let mut l2 = lens.clone();
                    (l2[i - 1], l2[i]) = (m2 - a, e - m2);
                    if lengths_ok(&l2, feasible, lo, hi) {
                        alts.push(sse(&d[a..m2]) + sse(&d[m2..e]) - old);
                    }
                }
            }
            let mut l2 = lens.clone();
            l2[i - 1] += l2.remove(i);
            if lengths_ok(&l2, feasible, lo, hi) {
                alts.push(sse(&d[a..e]) - old - cfg.chunk_penalty);
            }
            for delta in alts {
                prop_assert!(
                    delta >= -1e-9,
                    "seq {}: boundary {} improves by {}",
                    s,
                    mid,
                    -delta
                );
            }
        }
    }
    Ok(Layout {
        so,
        n,
        co,
        clen,
        by_seq,
    })
}

/// §4 gates: reference formula from the chunk ranks.
fn check_gates(cfg: &SchedulerConfig, p: &Plan, lay: &Layout) -> Result<(), TestCaseError> {
    let (co, clen) = (&lay.co, &lay.clen);
    let nc = clen.len();
    let equal_scales = equal_scales(cfg);
    for c in 0..nc {
        let prev = (c > 0 && p.chunk_seq[c - 1] == p.chunk_seq[c]).then(|| p.chunk_rank[c - 1]);
        let bb = p.chunk_rank[c];
        for i in 0..clen[c] {
            let t = co[c] + i;
            let (rank, tlo, glo, ghi) =
                (p.token_rank[t], p.token_lo[t], p.gate_lo[t], p.gate_hi[t]);
            prop_assert!(tlo <= rank);
            if equal_scales {
                prop_assert!((0.0..=1.0).contains(&glo) && (0.0..=1.0).contains(&ghi));
            }
            match prev {
                Some(a) if a != bb && i < cfg.crossfade => {
                    check_ramp_token(
                        cfg,
                        (a, bb, i),
                        (rank, tlo, glo, ghi),
                        &format!("token {t}"),
                    )?;
                }
                _ => prop_assert_eq!(
                    (rank, tlo, glo, ghi),
                    (bb, bb, 1.0, 1.0),
                    "plain token {}",
                    t
                ),
            }
        }
    }
    Ok(())
}

/// §4 segments: maximal runs of one rank within a sequence, with their scale and adapter.
fn check_segments(
    cfg: &SchedulerConfig,
    b: &Batch,
    p: &Plan,
    lay: &Layout,
) -> Result<(), TestCaseError> {
    let (so, n) = (&lay.so, lay.n);
    let sg = &p.segments;
    let ns = sg.rank.len();
    prop_assert_eq!(
        (sg.offsets.len(), sg.scale.len(), sg.adapter.len()),
        (ns + 1, ns, ns)
    );
    prop_assert_eq!((sg.offsets[0], sg.offsets[ns]), (0, n as i32));
    prop_assert!(sg.offsets.windows(2).all(|w| w[0] < w[1]));
    for k in 0..ns {
        let (a, e) = (sg.offsets[k] as usize, sg.offsets[k + 1] as usize);
        let s = so.partition_point(|&o| o <= a) - 1;
        prop_assert!(e <= so[s + 1], "segment {} crosses a sequence", k);
        prop_assert!(p.token_rank[a..e].iter().all(|&r| r == sg.rank[k]));
        prop_assert_eq!(sg.scale[k], cfg.scale_of_rank(sg.rank[k] as u32) as f32);
        prop_assert_eq!(sg.adapter[k], b.adapters.as_ref().map_or(0, |v| v[s]));
        if k > 0 && a != so[s] {
            prop_assert!(
                sg.rank[k - 1] != sg.rank[k],
                "segments {} and {} should merge",
                k - 1,
                k
            );
        }
    }
    Ok(())
}
