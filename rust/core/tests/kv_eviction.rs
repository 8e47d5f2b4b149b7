//! KV ledger: eviction decisions against a brute-force reference, the padding/mask invariant,
//! and errors for bad policies and inputs.

mod common;

use chunkwise_core::kv::{KvLedger, KvPolicy, DEAD};
use chunkwise_core::CoreError;
use proptest::prelude::*;

/// A reference slot: (column, chunk, difficulty, score).
type Slot = (u64, u64, f32, f32);

/// Brute force: rank every real slot by (protected, value, column) and keep the best `target`;
/// padding fills the rest from the newest padding slot backwards.
fn reference_keep(policy: &KvPolicy, row: &[Slot], pad: u64, target: usize) -> Vec<u64> {
    let real: Vec<&Slot> = row.iter().filter(|s| s.0 >= pad).collect();
    let pads: Vec<&Slot> = row.iter().filter(|s| s.0 < pad).collect();
    if real.len() <= target {
        let mut keep: Vec<u64> = pads[pads.len() - (target - real.len())..]
            .iter()
            .map(|s| s.0)
            .collect();
        keep.extend(real.iter().map(|s| s.0));
        return keep;
    }
    let n = real.len();
    let sinks = policy.sinks.min(target);
    let window = policy.window.min(target - sinks);
    let middle_max = real[sinks..n - window]
        .iter()
        .map(|s| s.3)
        .fold(0.0f32, f32::max);
    let chunk_mean = |c: u64| {
        // The mean difficulty of the run of equal chunk ids containing this chunk (real slots:
        // padding belongs to no chunk).
        let idx: Vec<usize> = (0..row.len())
            .filter(|&i| row[i].1 == c && row[i].0 >= pad)
            .collect();
        idx.iter().map(|&i| row[i].2).sum::<f32>() / idx.len() as f32
    };
    let mut ranked: Vec<(bool, f32, u64)> = real
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let protected = i < sinks || i >= n - window;
            let attn = if middle_max > 0.0 {
                s.3 / middle_max
            } else {
                0.0
            };
            let value = if policy.scored() {
                policy.attention_weight * attn + policy.difficulty_weight * chunk_mean(s.1)
            } else {
                0.0
            };
            (protected, value, s.0)
        })
        .collect();
    ranked.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.total_cmp(&a.1)).then(b.2.cmp(&a.2)));
    let mut keep: Vec<u64> = ranked[..target].iter().map(|r| r.2).collect();
    keep.sort_unstable();
    keep
}

fn policies() -> impl Strategy<Value = KvPolicy> {
    (0usize..4, 0usize..12, 0usize..20, 0usize..6, 0u8..4).prop_map(
        |(sinks, window, extra, slack, w)| KvPolicy {
            sinks,
            window,
            budget: Some(sinks + window + extra + 1),
            slack,
            attention_weight: if w & 1 == 1 { 1.0 } else { 0.0 },
            difficulty_weight: if w & 2 == 2 { 0.7 } else { 0.0 },
        },
    )
}

proptest! {
    #![proptest_config(common::pt_seeded(200, 0x6b76))]

    /// Every eviction keeps exactly the reference's columns, and the slot layout always matches
    /// the last `len` columns of the padding mask.
    #[test]
    fn evictions_match_reference(
        policy in policies(),
        pads in prop::collection::vec(0usize..30, 1..4),
        prefill in 1usize..40,
        steps in prop::collection::vec((1usize..4, any::<u32>()), 1..60),
    ) {
        let batch = pads.len();
        let width = prefill.max(*pads.iter().max().unwrap());
        let mut ledger = KvLedger::new(policy, pads.clone()).unwrap();
        let mut rows: Vec<Vec<Slot>> = vec![Vec::new(); batch];
        // Chunk ids grow with the column, as a decoder's chunk counter does.
        let chunk_of = |col: usize| (col / (1 + prefill % 7)) as u64 * 3 + 1;
        for (step, &(n, seed)) in std::iter::once(&(width, 17u32)).chain(steps.iter()).enumerate() {
            // The slots held at full precision when each row may hold `n_full`: the real
            // slots an eviction to `n_full` would keep.
            let len = ledger.len();
            let n_full = (seed as usize) % (len + 2);
            let full = ledger.full_precision(n_full);
            for (b, row) in rows.iter().enumerate() {
                let mut want = reference_keep(&policy, row, pads[b] as u64, n_full.min(row.len()));
                want.retain(|&c| c >= pads[b] as u64);
                let got: Vec<u64> = (0..len).filter(|&j| full[b * len + j]).map(|j| row[j].0).collect();
                prop_assert_eq!(&got, &want, "full precision: row {} step {} n_full {}", b, step, n_full);
            }
            // Evict as the next forward would, and compare with the reference.
            let target = ledger.pending_len();
            if let Some(keep) = ledger.evict() {
                for (b, row) in rows.iter_mut().enumerate() {
                    let want = reference_keep(&policy, row, pads[b] as u64, target);
                    let idx = &keep[b * target..(b + 1) * target];
                    let got: Vec<u64> = idx.iter().map(|&i| row[i].0).collect();
                    prop_assert_eq!(&got, &want, "row {} step {}", b, step);
                    *row = idx.iter().map(|&i| row[i]).collect();
                }
            }
            let seen = ledger.seen();
            let diff: Vec<f32> = (0..batch * n).map(|i| ((i as u32 ^ seed) % 11) as f32 / 10.0).collect();
            let chunk: Vec<u64> = (0..batch * n).map(|i| chunk_of(seen + i % n)).collect();
            ledger.append(n, Some(&diff), Some(&chunk)).unwrap();
            for (b, row) in rows.iter_mut().enumerate() {
                for i in 0..n {
                    row.push(((seen + i) as u64, chunk[b * n + i], diff[b * n + i], 0.0));
                }
            }
            let len = ledger.len();
            let scores: Vec<f32> = (0..batch * len).map(|i| ((i as u32).wrapping_mul(seed | 1) % 13) as f32).collect();
            ledger.add_scores(&scores).unwrap();
            for (b, row) in rows.iter_mut().enumerate() {
                for (j, slot) in row.iter_mut().enumerate() {
                    slot.3 += scores[b * len + j];
                }
            }
            let cols = ledger.columns();
            for (b, &pad) in pads.iter().enumerate() {
                for j in 0..len {
                    let slot_is_pad = cols[b * len + j] < pad as u64;
                    let mask_is_pad = ledger.seen() - len + j < pad;
                    prop_assert_eq!(slot_is_pad, mask_is_pad, "row {} slot {}", b, j);
                }
            }
            prop_assert!(len <= policy.budget.unwrap() + policy.slack + n.max(width));
        }
    }
}

proptest! {
    #![proptest_config(common::pt_seeded(200, 0x7072))]

    /// A per-row ledger holds, in every row, exactly the real columns a ledger of that row alone
    /// (its real tokens only, no padding) holds, after every eviction, with the same scores and
    /// difficulty; padding and dead slots are never valid.
    #[test]
    fn per_row_ledger_rows_equal_the_rows_alone(
        policy in policies(),
        pads in prop::collection::vec(0usize..30, 1..4),
        prefill in 1usize..40,
        steps in prop::collection::vec((1usize..4, any::<u32>()), 1..60),
    ) {
        let batch = pads.len();
        let width = prefill.max(*pads.iter().max().unwrap());
        let mut ledger = KvLedger::new(policy, pads.clone()).unwrap().per_row();
        let mut alone: Vec<KvLedger> = pads.iter().map(|_| KvLedger::new(policy, vec![0]).unwrap()).collect();
        let value = |b: usize, col: usize, seed: u32| ((col as u32 ^ seed ^ (b as u32 * 7)) % 11) as f32 / 10.0;
        for &(n, seed) in std::iter::once(&(width, 17u32)).chain(steps.iter()) {
            ledger.evict();
            for a in alone.iter_mut() {
                a.evict();
            }
            let valid = ledger.valid();
            let cols = ledger.columns();
            let len = ledger.len();
            for (b, &pad) in pads.iter().enumerate() {
                let mine: Vec<u64> = (0..len)
                    .filter(|&j| valid[b * len + j])
                    .map(|j| cols[b * len + j] - pad as u64)
                    .collect();
                prop_assert_eq!(&mine, &alone[b].columns(), "row {}", b);
                for j in 0..len {
                    let c = cols[b * len + j];
                    prop_assert_eq!(valid[b * len + j], c != DEAD && c >= pad as u64);
                }
            }
            // n new columns; row b's real ones go to its alone ledger too
            let seen = ledger.seen();
            let diff: Vec<f32> = (0..batch * n).map(|i| value(i / n, seen + i % n, seed)).collect();
            let chunk: Vec<u64> = (0..batch * n).map(|i| ((seen + i % n) / 3) as u64).collect();
            ledger.append(n, Some(&diff), Some(&chunk)).unwrap();
            for (b, a) in alone.iter_mut().enumerate() {
                let real: Vec<usize> = (seen..seen + n).filter(|&c| c >= pads[b]).collect();
                let d: Vec<f32> = real.iter().map(|&c| value(b, c, seed)).collect();
                // chunk ids of the padded stream: runs must be the same in both
                let ch: Vec<u64> = real.iter().map(|&c| (c / 3) as u64).collect();
                a.append(real.len(), Some(&d), Some(&ch)).unwrap();
            }
            // attention: a score per real slot (what masked slots get is 0)
            let len = ledger.len();
            let (valid, cols) = (ledger.valid(), ledger.columns());
            let scores: Vec<f32> = (0..batch * len)
                .map(|i| if valid[i] { ((cols[i] as u32).wrapping_mul(seed | 1) % 13) as f32 } else { 0.0 })
                .collect();
            ledger.add_scores(&scores).unwrap();
            for (b, a) in alone.iter_mut().enumerate() {
                let s: Vec<f32> = a
                    .columns()
                    .iter()
                    .map(|&c| (((c + pads[b] as u64) as u32).wrapping_mul(seed | 1) % 13) as f32)
                    .collect();
                a.add_scores(&s).unwrap();
            }
        }
    }
}

#[test]
fn full_policy_never_evicts() {
    let mut ledger = KvLedger::new(KvPolicy::full(), vec![0, 3]).unwrap();
    for _ in 0..500 {
        ledger.append(1, None, None).unwrap();
        assert!(ledger.evict().is_none());
    }
    assert_eq!(ledger.len(), 500);
}

#[test]
fn window_stays_flat_over_ten_thousand_steps() {
    let policy = KvPolicy {
        window: 64,
        budget: Some(64),
        slack: 8,
        ..KvPolicy::full()
    };
    let mut ledger = KvLedger::new(policy, vec![0]).unwrap();
    for _ in 0..10_000 {
        ledger.evict();
        ledger.append(1, None, None).unwrap();
        assert!(ledger.len() <= 64 + 8 + 1);
    }
    ledger.evict();
    let cols = ledger.columns();
    assert_eq!(cols.len(), 64);
    assert_eq!(cols[0], 10_000 - 64);
}

fn config_param(policy: KvPolicy) -> &'static str {
    match KvLedger::new(policy, vec![0]) {
        Err(CoreError::InvalidConfig { param, .. }) => param,
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn bad_policies_name_their_parameter() {
    let base = KvPolicy::full();
    let small = KvPolicy {
        sinks: 4,
        window: 8,
        budget: Some(10),
        ..base
    };
    assert_eq!(config_param(small), "budget");
    assert_eq!(
        config_param(KvPolicy {
            budget: Some(0),
            ..base
        }),
        "budget"
    );
    assert_eq!(
        config_param(KvPolicy {
            attention_weight: -1.0,
            ..base
        }),
        "attention_weight"
    );
    assert_eq!(
        config_param(KvPolicy {
            difficulty_weight: f32::NAN,
            ..base
        }),
        "difficulty_weight"
    );
}

#[test]
fn bad_inputs_name_their_parameter() {
    let mut ledger = KvLedger::new(KvPolicy::full(), vec![0, 0]).unwrap();
    let err = ledger.append(2, Some(&[0.5; 3]), None).unwrap_err();
    assert_eq!(err.param(), "difficulty");
    let err = ledger.append(1, Some(&[0.5, 1.5]), None).unwrap_err();
    assert_eq!(err.param(), "difficulty");
    let err = ledger.append(1, None, Some(&[1])).unwrap_err();
    assert_eq!(err.param(), "chunk");
    ledger.append(2, None, None).unwrap();
    assert_eq!(ledger.add_scores(&[1.0; 3]).unwrap_err().param(), "scores");
    assert_eq!(ledger.add_scores(&[-1.0; 4]).unwrap_err().param(), "scores");
    assert!(matches!(
        KvLedger::new(KvPolicy::full(), vec![]),
        Err(CoreError::InvalidInput { .. })
    ));
    assert_eq!(
        ledger.revise_difficulty(&[0.5; 3]).unwrap_err().param(),
        "difficulty"
    );
    assert_eq!(
        ledger.revise_difficulty(&[0.5; 6]).unwrap_err().param(),
        "difficulty"
    );
    assert_eq!(
        ledger.revise_difficulty(&[2.0; 2]).unwrap_err().param(),
        "difficulty"
    );
}

#[test]
fn revised_difficulty_lands_on_the_newest_slots() {
    let mut ledger = KvLedger::new(KvPolicy::full(), vec![0, 1]).unwrap();
    ledger.append(3, Some(&[0.1; 6]), None).unwrap();
    ledger.revise_difficulty(&[0.5, 0.6, 0.7, 0.8]).unwrap();
    assert_eq!(ledger.difficulty(), vec![0.1, 0.5, 0.6, 0.1, 0.7, 0.8]);
}

/// A per-row ledger evicts each row when its own real slots pass budget + slack, as that row
/// would alone; shorter rows get dead slots in front, which `valid` masks.
#[test]
fn per_row_ledger_evicts_each_row_as_alone() {
    let policy = KvPolicy {
        sinks: 0,
        window: 2,
        budget: Some(2),
        slack: 2,
        attention_weight: 0.0,
        difficulty_weight: 0.0,
    };
    let mut batch = KvLedger::new(policy, vec![0, 3]).unwrap().per_row();
    let mut alone = KvLedger::new(policy, vec![0]).unwrap();
    batch.append(6, None, None).unwrap();
    alone.append(6, None, None).unwrap();
    // row 0 holds 6 real slots (> 4): to 2; row 1 holds 3 real ones: all kept, padding dropped
    assert_eq!(batch.pending_len(), 3);
    let keep = batch.evict().unwrap();
    assert_eq!(keep, vec![4, 4, 5, 3, 4, 5]);
    assert_eq!(batch.columns(), vec![DEAD, 4, 5, 3, 4, 5]);
    assert_eq!(batch.valid(), vec![false, true, true, true, true, true]);
    assert_eq!(alone.evict().unwrap(), vec![4, 5]);
    assert!(batch.evict().is_none(), "evict is idempotent");
    // two tokens on: row 0 holds 4 real slots (not over 4), row 1 holds 5: only row 1 evicts,
    // and row 0 keeps all four (a shared ledger would have cut it to 2 as well)
    batch.append(2, None, None).unwrap();
    assert_eq!(batch.pending_len(), 4);
    assert_eq!(batch.evict().unwrap(), vec![1, 2, 3, 4, 3, 3, 3, 4]);
    assert_eq!(batch.columns(), vec![4, 5, 6, 7, DEAD, DEAD, 6, 7]);
    assert_eq!(
        batch.valid(),
        vec![true, true, true, true, false, false, true, true]
    );
}
