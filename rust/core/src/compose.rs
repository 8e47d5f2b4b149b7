//! Boundary-safe composition: cross-fade gates at rank changes, and the kernel segments.
//!
//! A ramp token runs at the larger of the two ranks; directions below the smaller rank get
//! `gate_lo`, the band between the ranks gets `gate_hi` (docs/architecture.md §4).

use crate::config::SchedulerConfig;

/// What the layer applies to one token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenGate {
    /// Rank the layer runs at for this token.
    pub rank: u32,
    /// Directions below this index get `gate_lo`, the others (up to `rank`) `gate_hi`.
    pub lo: u32,
    pub gate_lo: f32,
    pub gate_hi: f32,
}

impl TokenGate {
    /// A token fully at `rank` (no ramp).
    pub fn plain(rank: u32) -> Self {
        Self {
            rank,
            lo: rank,
            gate_lo: 1.0,
            gate_hi: 1.0,
        }
    }
}

/// Gate of the `i`-th token (0-based) after a change from rank `a` to rank `b`, or `None` once
/// the ramp is over (or there is no change / no cross-fade).
pub fn ramp(cfg: &SchedulerConfig, a: u32, b: u32, i: usize) -> Option<TokenGate> {
    let w = cfg.crossfade;
    if a == b || i >= w {
        return None;
    }
    let alpha = (i + 1) as f64 / (w + 1) as f64;
    let (sa, sb) = (cfg.scale_of_rank(a), cfg.scale_of_rank(b));
    let (lo, hi) = (a.min(b), a.max(b));
    let (s_lo, s_hi) = (cfg.scale_of_rank(lo), cfg.scale_of_rank(hi));
    // The shared directions j < lo weigh (1 - α)·s_a + α·s_b; the band lo ≤ j < hi weighs
    // s_hi·α (or s_hi·(1 - α)). The layer multiplies the gates by the token's rung scale.
    let shared = (1.0 - alpha) * sa + alpha * sb;
    if s_hi == 0.0 {
        // The band weighs 0: the token runs at the lower rank, whose scale carries the shared
        // weight (dividing by s_hi = 0 would lose it).
        let gate_lo = if s_lo > 0.0 { shared / s_lo } else { 0.0 };
        return Some(TokenGate {
            rank: lo,
            lo,
            gate_lo: gate_lo as f32,
            gate_hi: 1.0,
        });
    }
    let gate_hi = if b > a { alpha } else { 1.0 - alpha };
    Some(TokenGate {
        rank: hi,
        lo,
        gate_lo: (shared / s_hi) as f32,
        gate_hi: gate_hi as f32,
    })
}

/// Per-token gates of one sequence from its chunk offsets (local, `[0, …, T]`) and chunk ranks.
pub fn sequence_gates(
    cfg: &SchedulerConfig,
    offsets: &[usize],
    ranks: &[u32],
    out: &mut Vec<TokenGate>,
) {
    for (c, w) in offsets.windows(2).enumerate() {
        let prev = if c == 0 { ranks[c] } else { ranks[c - 1] };
        out.extend(
            (0..w[1] - w[0])
                .map(|i| ramp(cfg, prev, ranks[c], i).unwrap_or(TokenGate::plain(ranks[c]))),
        );
    }
}

/// Kernel segments: maximal runs of equal rank inside each sequence.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Segments {
    pub offsets: Vec<i32>,
    pub rank: Vec<i32>,
    pub scale: Vec<f32>,
    pub adapter: Vec<i32>,
}

impl Segments {
    /// Builds segments over the flattened batch from token ranks, sequence offsets and adapters.
    pub fn build(
        cfg: &SchedulerConfig,
        token_rank: &[i32],
        seq_offsets: &[usize],
        adapters: &[i32],
    ) -> Self {
        let mut s = Segments {
            offsets: vec![0],
            ..Default::default()
        };
        for (b, w) in seq_offsets.windows(2).enumerate() {
            for t in w[0]..w[1] {
                let r = token_rank[t];
                let extends = t > w[0] && token_rank[t - 1] == r;
                if !extends {
                    if t > 0 {
                        s.offsets.push(t as i32);
                    }
                    s.rank.push(r);
                    s.scale.push(cfg.scale_of_rank(r as u32) as f32);
                    s.adapter.push(adapters[b]);
                }
            }
        }
        s.offsets.push(*seq_offsets.last().unwrap_or(&0) as i32);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramp_up_and_down_cross_fade() {
        let mut cfg = SchedulerConfig::with_rungs(vec![0, 4, 8]);
        cfg.crossfade = 3;
        let up = ramp(&cfg, 4, 8, 0).unwrap();
        assert_eq!((up.rank, up.lo, up.gate_lo, up.gate_hi), (8, 4, 1.0, 0.25));
        let down = ramp(&cfg, 8, 4, 2).unwrap();
        assert_eq!((down.rank, down.lo, down.gate_hi), (8, 4, 0.25));
        assert!(ramp(&cfg, 8, 4, 3).is_none());
        cfg.rung_scales = vec![1.0, 1.0, 2.0];
        let up = ramp(&cfg, 4, 8, 0).unwrap();
        // (0.75*1 + 0.25*2) / 2
        assert!((up.gate_lo - 0.625).abs() < 1e-7);
    }

    #[test]
    fn zero_upper_scale_keeps_the_shared_weight() {
        // Rank 8 has scale 0: a 4 -> 8 ramp must fade rank 4 out ((1 - α)·1), not weigh 0.
        let mut cfg = SchedulerConfig::with_rungs(vec![0, 4, 8]);
        cfg.crossfade = 3;
        cfg.rung_scales = vec![1.0, 2.0, 0.0];
        for i in 0..3 {
            let alpha = (i + 1) as f32 / 4.0;
            for (a, b) in [(4, 8), (8, 4)] {
                let g = ramp(&cfg, a, b, i).unwrap();
                let want = if a == 4 { 1.0 - alpha } else { alpha };
                assert_eq!((g.rank, g.lo), (4, 4));
                // the layer applies scale_of_rank(4) = 2 times gate_lo to directions < 4
                assert!(
                    (2.0 * g.gate_lo - 2.0 * want).abs() < 1e-6,
                    "{a}->{b} i={i}: {g:?}"
                );
            }
        }
    }

    #[test]
    fn segments_merge_equal_ranks_within_sequences() {
        let cfg = SchedulerConfig::with_rungs(vec![0, 4, 8]);
        let s = Segments::build(&cfg, &[4, 4, 8, 8, 8, 0], &[0, 4, 6], &[0, 1]);
        assert_eq!(s.offsets, vec![0, 2, 4, 5, 6]);
        assert_eq!(s.rank, vec![4, 8, 8, 0]);
        assert_eq!(s.adapter, vec![0, 0, 1, 1]);
    }
}
