//! The simulator runs the shared control loop and nothing else: fed the observations the
//! simulator gave it, the same loop outside the simulator makes the same decisions and gives the
//! same orders, step for step.

use dopd_planner::control::{ControlConfig, Controller, Order, Orders};
use dopd_planner::planner::{Planner, PlannerConfig, PolicyKind};
use dopd_planner::profile::Profile;
use dopd_planner::profile::roofline::RooflineSpec;
use dopd_sim::{PolicySpec, SimConfig, SimRequest, SimResult, simulate};

/// Quiet, a burst, a lull, a longer burst with longer prompts, silence, then a trickle.
fn scripted() -> Vec<SimRequest> {
    let phases: [(f64, f64, u32, u32); 6] = [
        // (seconds, requests per second, ISL, OSL)
        (60.0, 1.0, 800, 200),
        (60.0, 12.0, 1200, 250),
        (40.0, 2.0, 600, 150),
        (80.0, 16.0, 2500, 300),
        (420.0, 0.0, 0, 0),
        (60.0, 0.5, 400, 100),
    ];
    let mut out = Vec::new();
    let mut t0 = 0.0;
    for (k, (len, rate, isl, osl)) in phases.into_iter().enumerate() {
        if rate > 0.0 {
            let n = (len * rate) as u32;
            for i in 0..n {
                // Lengths vary around the phase's mean, deterministically.
                let wiggle = (i * 37 + k as u32 * 11) % 9;
                out.push(SimRequest {
                    arrival_s: t0 + f64::from(i) / rate,
                    isl: isl / 2 + isl * wiggle / 8,
                    osl: osl / 2 + osl * wiggle / 8,
                });
            }
        }
        t0 += len;
    }
    out
}

/// The run of `policy` on the scripted workload with every control step recorded.
fn recorded(policy: PolicySpec) -> (Profile, SimConfig, SimResult) {
    let profile = RooflineSpec::llama33_70b_fp8_h100()
        .build()
        .expect("preset");
    let mut planner = PlannerConfig::default();
    planner.sizing.gpu_budget = 24;
    // A short scale-down hold, so that this short script sees both directions.
    planner.slo_policy.hold_startups = 1.0;
    let cfg = SimConfig {
        policy,
        planner,
        record_control: true,
        ..SimConfig::default()
    };
    let run = simulate(&scripted(), &profile, &cfg).expect("runs");
    (profile, cfg, run)
}

#[test]
fn the_simulator_and_the_loop_fed_its_observations_decide_the_same() {
    let (profile, cfg, run) = recorded(PolicySpec::Dopd);
    let ticks = run.control.iter().filter(|s| s.decision.is_some()).count();
    assert!(ticks >= 30, "{ticks} ticks");
    // The run scaled both ways, and drained something.
    let targets: Vec<u32> = run
        .control
        .iter()
        .filter_map(|s| s.decision.as_ref().map(|d| d.target.decode))
        .collect();
    assert!(targets.windows(2).any(|w| w[1] > w[0]), "{targets:?}");
    assert!(targets.windows(2).any(|w| w[1] < w[0]), "{targets:?}");
    assert!(
        run.control
            .iter()
            .flat_map(|s| &s.orders.0)
            .any(|o| matches!(o, Order::Drain { .. } | Order::Retire { .. })),
        "no scale-down orders"
    );

    // The same loop, outside the simulator, fed what the simulator observed.
    let planner = dopd_sim::planner_config(&cfg);
    assert_eq!(planner.policy, PolicyKind::Dopd);
    let control = ControlConfig {
        interval_s: cfg.interval_s,
        drain_timeout_s: f64::INFINITY,
        headroom: false,
        paused: false,
    };
    let planner = Planner::new(profile, planner).expect("planner");
    let mut ctrl = Controller::new(planner, control, cfg.initial);
    for (k, step) in run.control.iter().enumerate() {
        let mut orders = Orders::default();
        let report = ctrl.step(step.at, &step.snapshot, &mut orders);
        assert_eq!(
            report.tick.map(|t| t.decision),
            step.decision,
            "step {k} at {} s",
            step.at
        );
        assert_eq!(orders, step.orders, "step {k} at {} s", step.at);
    }
}

#[test]
fn the_oracle_sizes_for_the_true_next_interval_through_the_same_loop() {
    let (_, _, run) = recorded(PolicySpec::Oracle);
    // The tick before the burst (at 60 s) already sizes for it: the oracle knows the next
    // interval, the forecasting loop does not.
    let at = |t: f64| {
        run.control
            .iter()
            .find(|s| (s.at - t).abs() < 1e-9 && s.decision.is_some())
            .and_then(|s| s.snapshot.known_next)
    };
    let next = at(60.0).expect("a tick at 60 s with the next interval known");
    assert!(next.requests >= 100.0, "{next:?}");
    let thresholds: Vec<f64> = run
        .control
        .iter()
        .flat_map(|s| &s.orders.0)
        .filter_map(|o| match o {
            Order::RoutingThreshold { isl } => Some(*isl),
            _ => None,
        })
        .collect();
    assert!(!thresholds.is_empty());
}
