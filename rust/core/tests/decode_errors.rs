//! Errors of streaming decode (docs/architecture.md §5): a bad step or decoder setup is an Err
//! naming the parameter, never a panic, and a failed step advances nothing. The properties of
//! valid streams are in decode_properties.rs.

mod common;

use chunkwise_core::decode::DecodeBatch;
use chunkwise_core::difficulty::SignalArrays;
use chunkwise_core::signals::RarityTable;
use chunkwise_core::{PlanInput, Planner, SchedulerConfig};
use common::decode_gen::{config, pt, streams, Out};
use proptest::prelude::*;

proptest! {
    #![proptest_config(pt(128))]

    #[test]
    fn bad_steps_are_errors_and_change_nothing(
        cfg in config(), st in streams(), kind in 0u8..6, pos in 0usize..1000,
    ) {
        let planner = st.planner(&cfg);
        let mut dec = DecodeBatch::new(&planner, st.b, None).unwrap();
        let mut out = Out::new(st.b);
        let half = st.t / 2;
        for step in 0..half {
            out.step(&mut dec, &planner, &st.col(&st.ids, step), SignalArrays::default()).unwrap();
        }
        let before = dec.clone();
        let mut ids = st.col(&st.ids, half.min(st.t - 1));
        let mut sig = vec![0.5f32; st.b];
        let i = pos % st.b;
        let (name, result) = match kind {
            0 => {
                ids.push(1);
                ("token_ids", out.step(&mut dec, &planner, &ids, SignalArrays::default()))
            }
            1 => {
                ids[i] = -1;
                ("token_ids", out.step(&mut dec, &planner, &ids, SignalArrays::default()))
            }
            2 => {
                let table = RarityTable::from_counts(&[1.0, 2.0]).unwrap();
                let mut c2 = cfg.clone();
                c2.weights.rarity = 1.0;
                let p2 = Planner::new(c2, Some(table)).unwrap();
                dec = DecodeBatch::new(&p2, st.b, None).unwrap();
                ids[i] = 2 + pos as i64 % 5;
                ("token_ids", out.step(&mut dec, &p2, &ids, SignalArrays::default()))
            }
            3 => {
                sig[i] = [f32::NAN, f32::INFINITY, -0.1, 1.1][pos % 4];
                let s = SignalArrays { entropy: Some(&sig), ..Default::default() };
                ("entropy", out.step(&mut dec, &planner, &ids, s))
            }
            4 => {
                sig.push(0.5);
                let s = SignalArrays { surprisal: Some(&sig), ..Default::default() };
                ("surprisal", out.step(&mut dec, &planner, &ids, s))
            }
            _ => {
                sig[i] = [f32::NAN, -1.0][pos % 2];
                let s = SignalArrays { probe: Some(&sig), ..Default::default() };
                ("probe", out.step(&mut dec, &planner, &ids, s))
            }
        };
        prop_assert_eq!(result.err().map(|e| e.param()), Some(name));
        if kind != 2 {
            // All or nothing: the rest of the stream decodes as if the bad step never came.
            let mut again = before.clone();
            let mut o2 = Out::new(st.b);
            for step in half..st.t {
                let ids = st.col(&st.ids, step);
                out.step(&mut dec, &planner, &ids, SignalArrays::default()).unwrap();
                o2.step(&mut again, &planner, &ids, SignalArrays::default()).unwrap();
                prop_assert_eq!(&out, &o2);
            }
        }
    }
}

#[test]
fn bad_decoder_setup_is_an_error() {
    let cfg = SchedulerConfig::with_rungs(vec![0, 4, 8]);
    let planner = Planner::new(cfg, None).unwrap();
    let param = |r: chunkwise_core::Result<DecodeBatch>| r.unwrap_err().param();
    assert_eq!(param(DecodeBatch::new(&planner, 0, None)), "batch_size");
    assert_eq!(
        param(DecodeBatch::new(&planner, 2, Some(vec![0.5]))),
        "thresholds"
    );
    assert_eq!(
        param(DecodeBatch::new(&planner, 2, Some(vec![0.5, f64::NAN]))),
        "thresholds"
    );
    assert_eq!(
        param(DecodeBatch::new(&planner, 2, Some(vec![0.6, 0.3]))),
        "thresholds"
    );
    let mut dec = DecodeBatch::new(&planner, 2, None).unwrap();
    assert_eq!(dec.reset(&planner, 2).unwrap_err().param(), "index");
}

// Regression: prefill and decode must agree on ids outside the unigram table when the rarity
// weight is 0 (decode used to reject them, prefill accepted them; both accept them now).
#[test]
fn prefill_and_decode_agree_on_ids_outside_the_table() {
    let mut cfg = SchedulerConfig::with_rungs(vec![0, 8]);
    cfg.weights.rarity = 0.0;
    let table = RarityTable::from_counts(&[1.0, 2.0]).unwrap();
    let planner = Planner::new(cfg, Some(table)).unwrap();
    let ids = [5i64];
    let prefill = planner.plan(&PlanInput {
        token_ids: &ids,
        seq_lengths: &[1],
        signals: SignalArrays::default(),
        difficulty: None,
        adapters: None,
    });
    let mut dec = DecodeBatch::new(&planner, 1, None).unwrap();
    let decode = Out::new(1).step(&mut dec, &planner, &ids, SignalArrays::default());
    assert_eq!(
        prefill.as_ref().err().map(|e| e.param()),
        decode.as_ref().err().map(|e| e.param()),
        "prefill {:?} vs decode {:?}",
        prefill.err(),
        decode.err()
    );
}

#[test]
fn a_batch_whose_novelty_tables_would_not_fit_is_refused_not_allocated() {
    use chunkwise_core::decode::MAX_DECODE_STATE_BYTES;
    use chunkwise_core::signals::NoveltyTracker;

    let cfg = SchedulerConfig::default();
    let planner = Planner::new(cfg.clone(), None).unwrap();
    let per_row = NoveltyTracker::table_bytes(cfg.novelty_window);
    let fits = MAX_DECODE_STATE_BYTES / per_row;
    // the largest batch that fits is accepted (and small enough to build here at the default)
    assert!(DecodeBatch::new(&planner, fits.min(1024), None).is_ok());
    let e = DecodeBatch::new(&planner, fits + 1, None).unwrap_err();
    assert_eq!(e.param(), "batch_size");
    assert!(e.to_string().contains("novelty_window"), "{e}");
    // without the novelty signal the rows hold no tables: the same batch is fine to ask for
    let mut off = cfg.clone();
    off.weights.novelty = 0.0;
    let planner = Planner::new(off, None).unwrap();
    assert!(DecodeBatch::new(&planner, 4096, None).is_ok());
}
