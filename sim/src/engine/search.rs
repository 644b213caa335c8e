//! The best static split with hindsight (`static:search`): the baseline every dynamic policy is
//! measured against.

use super::*;

/// DistServe-style search for the best static split: the `N_P:N_D` (each at least 1) that fits
/// `cfg.planner.sizing.gpu_budget` with the most requests meeting both SLOs, then the fewest
/// GPUs. (A count, not a rate: a rate over the run's duration would reward a split whose last
/// request ends a moment sooner, e.g. with several idle decode instances.) Returns the winner and
/// its run.
///
/// For each decode count it runs the most prefill the budget leaves, then finds the fewest
/// prefill instances with the same goodput by bisection (more prefill never serves fewer requests
/// within SLO), so a budget of `G` GPUs costs about `G/g_D · log2(G)` runs instead of `G²/2`.
/// Decode counts are tried in parallel, and the scan stops once three decode counts in a row
/// fall short of the best even with all the prefill they can have.
pub fn search_static(
    requests: &[SimRequest],
    profile: &Profile,
    cfg: &SimConfig,
) -> Result<(Replicas, SimResult), SimError> {
    let budget = cfg.planner.sizing.gpu_budget;
    let (g_p, g_d) = (profile.gpus.prefill.max(1), profile.gpus.decode.max(1));
    let max_decode = budget.saturating_sub(g_p) / g_d;
    let run = |prefill: u32, decode: u32| {
        let replicas = PerRole { prefill, decode };
        let run_cfg = SimConfig {
            policy: PolicySpec::Static { replicas },
            initial: replicas,
            record_control: false,
            ..cfg.clone()
        };
        simulate(requests, profile, &run_cfg).map(|r| (replicas, r))
    };
    let goodput = |r: &SimResult| {
        r.records
            .iter()
            .filter(|x| x.met_slo && x.arrival_s >= cfg.score_from_s)
            .count() as f64
    };
    // The best split for `decode` decode instances.
    let best_for = |decode: u32| -> Result<(Replicas, SimResult), SimError> {
        let most = (budget - decode * g_d) / g_p;
        let top = run(most, decode)?;
        let want = goodput(&top.1) - 0.5;
        let (mut lo, mut hi, mut found) = (1, most, top);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let r = run(mid, decode)?;
            if goodput(&r.1) >= want {
                hi = mid;
                found = r;
            } else {
                lo = mid + 1;
            }
        }
        Ok(found)
    };
    let scored = requests
        .iter()
        .filter(|r| r.arrival_s >= cfg.score_from_s)
        .count() as f64;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8) as u32;
    let mut best: Option<(Replicas, SimResult)> = None;
    let mut worse_in_a_row = 0;
    let mut next = 1;
    while next <= max_decode && worse_in_a_row < 3 {
        let batch: Vec<u32> = (next..=max_decode.min(next + threads - 1)).collect();
        next += batch.len() as u32;
        let found: Vec<Result<(Replicas, SimResult), SimError>> = std::thread::scope(|sc| {
            let handles: Vec<_> = batch
                .iter()
                .map(|&d| sc.spawn(move || best_for(d)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or(Err(SimError::Invalid {
                        field: "search",
                        value: String::new(),
                        reason: "a search thread panicked",
                    }))
                })
                .collect()
        });
        for f in found {
            let (replicas, r) = f?;
            let better = best.as_ref().is_none_or(|(b, br)| {
                let (g, bg) = (goodput(&r), goodput(br));
                g > bg + 0.5 || ((g - bg).abs() <= 0.5 && replicas.gpus(profile) < b.gpus(profile))
            });
            // Stop only on splits that serve fewer, or as many with more GPUs, than a best that
            // serves most requests: among splits too small for the load, which requests still
            // make their SLOs says little (a deadline-first queue saves a few on one prefill
            // instance and none on many, whose prefills flood too few decode instances).
            let best_serves = best
                .as_ref()
                .is_some_and(|(_, br)| goodput(br) >= scored / 2.0);
            if better {
                best = Some((replicas, r));
                worse_in_a_row = 0;
            } else if best_serves {
                worse_in_a_row += 1;
            }
        }
    }
    best.ok_or(SimError::Invalid {
        field: "planner.sizing.gpu_budget",
        value: budget.to_string(),
        reason: "leaves no room for one prefill and one decode instance",
    })
}
