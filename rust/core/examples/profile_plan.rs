//! Times the pieces of an 8 × 4096 plan (for profiling; the benchmarks live in benches/).
//! Run: cargo run --release -p chunkwise-core --example profile_plan

use std::time::Instant;

use chunkwise_core::difficulty::SignalArrays;
use chunkwise_core::segment::Segmenter;
use chunkwise_core::{PlanInput, Planner, SchedulerConfig};

fn main() -> Result<(), chunkwise_core::CoreError> {
    let (b, t) = (8usize, 4096usize);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let ids: Vec<i64> = (0..b * t).map(|_| (rnd() % 49152) as i64).collect();
    let ent: Vec<f32> = (0..b * t).map(|_| (rnd() % 1000) as f32 / 1000.0).collect();
    let lens = vec![t; b];
    let cfg = SchedulerConfig::with_rungs(vec![0, 4, 8, 16, 32, 64]);
    let planner = Planner::new(cfg.clone(), None)?;
    let input = PlanInput {
        token_ids: &ids,
        seq_lengths: &lens,
        signals: SignalArrays {
            entropy: Some(&ent),
            surprisal: Some(&ent),
            probe: None,
        },
        difficulty: None,
        adapters: None,
    };
    // Fail loudly once if the input is bad, so the timings below never time an error path.
    planner.plan(&input)?;
    let time = |name: &str, f: &mut dyn FnMut()| {
        for _ in 0..5 {
            f();
        }
        let n = 50;
        let t0 = Instant::now();
        for _ in 0..n {
            f();
        }
        println!(
            "{name}: {:.3} ms",
            t0.elapsed().as_secs_f64() * 1e3 / n as f64
        );
    };
    time("plan 8x4096 (signals)", &mut || {
        let _ = planner.plan(&input);
    });
    if std::env::var_os("PLAN_ONLY").is_some() {
        let t0 = Instant::now();
        while t0.elapsed().as_secs_f64() < 3.0 {
            let _ = planner.plan(&input);
        }
        return Ok(());
    }
    let d: Vec<f32> = ent[..t].to_vec();
    let bounds = cfg.bounds();
    let mut seg = Segmenter::default();
    time("segment 1x4096", &mut || {
        seg.segment(&d, bounds);
    });
    let mut st = chunkwise_core::difficulty::DifficultyState::new(&cfg);
    for (name, nov, pos) in [("no novelty", 0.0, 0.25), ("no position", 0.5, 0.0)] {
        let mut c2 = cfg.clone();
        c2.weights.novelty = nov;
        c2.weights.position = pos;
        let mut st = chunkwise_core::difficulty::DifficultyState::new(&c2);
        time(&format!("difficulty 1x4096 {name}"), &mut || {
            for (i, &id) in ids[..t].iter().enumerate() {
                let _ = st.push(&c2, None, id, input.signals.at(i));
            }
        });
    }
    time("difficulty 1x4096", &mut || {
        for (i, &id) in ids[..t].iter().enumerate() {
            let _ = st.push(&cfg, None, id, input.signals.at(i));
        }
    });
    Ok(())
}
