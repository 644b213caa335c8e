//! The `dopd` policy's side of the planner: the SLO-aware sizing of each tick (`crate::slo`)
//! fed from the forecast and the tracker, and its start-up-priced scale-down hold.

use super::*;

impl Planner {
    /// How long each role's scale-down waits (the largest count desired within it stays): the
    /// SLO-aware policy prices it in start-ups, the others use `scale_down_stabilization_s`.
    pub(super) fn hold_windows(&self) -> PerRole<f64> {
        // The hold scales with how bursty the arrivals are: `hold_startups` start-ups at an
        // index of dispersion of 2, up to eight times that at 16. Bursty arrivals come back,
        // and the quieter spells between them are sat through rather than restarted from.
        // Below 2 it shortens to half for Poisson arrivals (the tracker's floor of 1), but only
        // where the sizing itself looks ahead over the start-up horizons (burst readiness on a
        // forecast): a smooth load's forecast then follows it down, and holding the falling
        // side of the sine row for three start-ups cost it 8% GPU-seconds. Sizing without that
        // look-ahead (the oracle's one known interval, or burst readiness off) keeps the
        // three: an oracle that shrank sooner restarted into each burst (conversation x4: 99.0%
        // -> 81.1%, `docs/experiments.md`).
        //
        // The stretch beyond three start-ups is for loads that fall quiet and come back: it
        // applies in proportion to how far the rate swings relative to its level (in full once
        // the swings' squared coefficient of variation reaches 1, swings the size of the level).
        // A busy load bursty at the scale of seconds (gamma arrivals, cv 2.5, 10 req/s) has a
        // high index of dispersion but swings by a fifth of its level; the surge readiness
        // covers those, and holding a cold start's peak for nine start-ups cost it 43% more
        // GPU-seconds than the static split (`docs/experiments.md`).
        let floor = if self.looks_ahead { 0.5 } else { 1.0 };
        let p = &self.cfg.slo_policy;
        let mut stretch = (self.tracker.dispersion / 2.0).clamp(floor, 8.0);
        if p.hold_by_swing && stretch > 1.0 {
            stretch = 1.0 + (stretch - 1.0) * self.tracker.swing.min(1.0);
        }
        let k = p.hold_startups * stretch;
        if self.cfg.policy == PolicyKind::Dopd && k > 0.0 {
            PerRole {
                prefill: k * self.profile.startup_s.prefill,
                decode: k * self.profile.startup_s.decode,
            }
        } else {
            PerRole {
                prefill: self.cfg.scale_down_stabilization_s,
                decode: self.cfg.scale_down_stabilization_s,
            }
        }
    }

    /// The `dopd` policy: the counts the SLOs need for the forecast (its upper bound over each
    /// role's start-up horizon when burst-ready), corrected by observed misses, within minimums,
    /// maximums and the budget.
    pub(super) fn slo_desired(
        &mut self,
        obs: &Observation,
        known: Option<SizingInput>,
        reasons: &mut Vec<Reason>,
    ) -> (Replicas, Option<WorkloadForecast>, SloSizing) {
        let interval = if obs.interval_s > 0.0 {
            obs.interval_s
        } else {
            10.0
        };
        let f = match known {
            Some(k) => {
                let exact = |v: f64| Forecast {
                    point: v,
                    lower: v,
                    upper: v,
                };
                WorkloadForecast {
                    requests: exact(k.requests),
                    isl: exact(k.isl),
                    osl: exact(k.osl),
                }
            }
            None => {
                let f = self.forecast();
                let held = self.requests.len();
                if held < self.warmup_len() {
                    reasons.push(Reason::Warmup { observations: held });
                }
                if f.isl.point > 0.0 {
                    self.isl_threshold = Some(f.isl.point);
                }
                f
            }
        };
        // Lengths: the oracle's truth, else the count-weighted recent means (steadier than a
        // forecast of one interval's mean), else the defaults.
        let t = &self.tracker;
        let (isl, osl) = match known {
            Some(k) => (k.isl, k.osl),
            None => (
                t.isl.unwrap_or(self.cfg.default_isl),
                t.osl.unwrap_or(self.cfg.default_osl),
            ),
        };
        let p = &self.cfg.slo_policy;
        // Burst readiness: a rising trend is carried over the role's start-up horizon, so the
        // instances asked for now serve the load that will be there when they are up.
        let trend = if known.is_none() {
            t.trend().max(0.0)
        } else {
            0.0
        };
        // And what the forecast has recently missed over that horizon (its surges) is provisioned
        // for too: the instances a surge needs cannot be started once it has come.
        let surge = if known.is_none() && p.burst_ready {
            t.surge()
        } else {
            0.0
        };
        // A step the forecast has not caught up with yet: when the interval just seen lies far
        // above the forecast (beyond three standard deviations of the counts' noise), the next
        // one is sized for what was seen. A forecaster that smooths needs a few intervals to
        // believe a new level, and each costs a start-up's worth of late instances.
        let seen = finite0(obs.requests);
        let noise = (f.requests.point.max(1.0) * t.dispersion.max(1.0)).sqrt();
        let point = if known.is_none() && p.burst_ready && seen > f.requests.point + 3.0 * noise {
            reasons.push(Reason::Step {
                seen,
                forecast: f.requests.point,
            });
            seen
        } else {
            f.requests.point
        };
        // The surges at forecasts like this one, in requests, once enough were seen there;
        // else the share of the forecast they rose by at any level.
        let near = if known.is_none() && p.burst_ready && p.level_surges {
            t.surge_near(point)
        } else {
            None
        };
        // What a level of `n` requests an interval is readied for.
        let with_surge = |n: f64| match near {
            Some(above) => n + above,
            None => n * (1.0 + surge),
        };
        let ready_for = with_surge(point);
        let rate = |startup: f64| {
            let h = headroom::horizon_intervals(startup, interval);
            let r = if p.burst_ready {
                (point + trend * f64::from(h)).max(ready_for)
            } else {
                point
            };
            r / interval
        };
        // The surges are measured against what the trend already carries over the prefill
        // horizon: a ramp the trend provisions for is not counted again as a surge, which
        // (relative to the forecast) would then be applied at the ramp's top, where the trend
        // is gone and the rate is highest.
        let h_p = headroom::horizon_intervals(self.profile.startup_s.prefill, interval);
        let carried = if p.burst_ready {
            f.requests.point + trend * f64::from(h_p)
        } else {
            f.requests.point
        };
        self.tracker.record_forecast(carried, h_p);
        let t = &self.tracker;
        // The profile is trusted for service times (observed latencies include queueing, which
        // the model adds itself); the closed loop corrects what the model misses.
        let one = PerRole {
            prefill: 1.0,
            decode: 1.0,
        };
        // A backlog in front of prefill is load too: the instances asked for now should clear it
        // within the start-up horizon, on top of the arrivals.
        let backlog =
            finite0(obs.prefill_queue_depth) / self.profile.startup_s.prefill.max(interval);
        let mut w = slo::Workload {
            rate_p: rate(self.profile.startup_s.prefill) + backlog,
            rate_d: rate(self.profile.startup_s.decode),
            rate_now: point / interval,
            isl,
            isl_cv2: t.isl_cv2,
            osl,
            osl_cv2: t.osl_cv2,
            arrival_cv2: t.queue_arrival_cv2(),
            kappa: one,
            transfer_s_per_token: if p.kv_link_bytes_per_s > 0.0 {
                self.profile.kv.bytes_per_token as f64 / p.kv_link_bytes_per_s
            } else {
                0.0
            },
            isl_shares: t.isl_shares.clone(),
            kv_scale: t.kv_scale,
        };
        let extra = PerRole {
            prefill: t.extra.prefill.round() as u32,
            decode: t.extra.decode.round() as u32,
        };
        // The decode instances' measured KV occupancy against the model's for the interval just
        // served (arrivals at their observed rate, the counts that were ready, the bypass then in
        // force), unless a backlog in front of prefill held arrivals back from decode.
        let ready = obs.replicas.decode.ready;
        if p.kv_calibration
            && known.is_none()
            && ready > 0
            && finite0(obs.prefill_queue_depth) < 1.0
        {
            let r = finite0(obs.requests) / interval;
            let served = slo::Workload {
                rate_p: r,
                rate_d: r,
                rate_now: r,
                ..w.clone()
            };
            let bypass = self.bypass.unwrap_or(0);
            let modelled =
                slo::kv_occupancy(&self.profile, &served, &self.cfg.slo, p, bypass, ready);
            self.tracker.observe_kv(obs.kv_usage, modelled);
            w.kv_scale = self.tracker.kv_scale;
        }
        let c = &self.cfg.sizing;
        let bounds = slo::Bounds {
            min: c.min_replicas,
            max: c.max_replicas,
            budget: c.gpu_budget,
            current: self.issued,
        };
        let s = slo::size(&self.profile, &w, &self.cfg.slo, p, extra, &bounds);
        // What the hold remembers: the arrivals at the forecast with their surges (a property of
        // the load, which the next tick provisions again), not the backlog nor the trend's
        // look-ahead. A trend the test finds in a noisy but level load asked for an instance
        // that the hold then kept for minutes (a decode-heavy load held a third decode instance
        // it needed for one tick in six, `docs/experiments.md`); a real ramp keeps its trend
        // and is provisioned at every tick of it.
        let arriving = with_surge(w.rate_now * interval) / interval;
        let held = (arriving.min(w.rate_p - backlog), arriving.min(w.rate_d));
        // Sized again only when a trend or a backlog added to the rates (most ticks add none).
        self.sustained = Some(if held == (w.rate_p, w.rate_d) {
            s.target
        } else {
            let arrivals = slo::Workload {
                rate_p: held.0,
                rate_d: held.1,
                ..w.clone()
            };
            slo::size(&self.profile, &arrivals, &self.cfg.slo, p, extra, &bounds).target
        });
        reasons.push(Reason::Forecast {
            requests: f.requests.point,
            isl,
            osl,
        });
        reasons.push(Reason::SloNeed {
            prefill: s.need.prefill,
            decode: s.need.decode,
            rate_p: w.rate_p,
            rate_d: w.rate_d,
            bypass_max_isl: s.bypass_max_isl,
            ttft_s: s.at_need.ttft_s,
            tpot_s: s.at_need.tpot_s,
        });
        for (role, x) in [(Role::Prefill, extra.prefill), (Role::Decode, extra.decode)] {
            if x > 0 {
                reasons.push(Reason::SloCorrection { role, extra: x });
            }
        }
        for role in [Role::Prefill, Role::Decode] {
            let (n, got) = (s.need.get(role), s.target.get(role));
            let min = c.min_replicas.get(role);
            if got < n && c.max_replicas.get(role).is_some_and(|m| got >= m) {
                reasons.push(Reason::MaxReplicas { role, max: got });
            } else if got > n && got == min {
                reasons.push(Reason::MinReplicas { role, min });
            }
        }
        if s.need.gpus(&self.profile) > c.gpu_budget && s.target != s.need {
            reasons.push(Reason::Budget {
                wanted_gpus: s.need.gpus(&self.profile),
                budget: c.gpu_budget,
            });
        }
        let tr = &mut self.tracker;
        tr.bound = PerRole {
            prefill: s.target.prefill < s.need.prefill,
            decode: s.target.decode < s.need.decode,
        };
        tr.last_target = s.target;
        self.bypass = Some(s.bypass_max_isl);
        (s.target, Some(f), s)
    }
}
