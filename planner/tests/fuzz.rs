//! Property-based fuzzing of the planner's readers of outside input: traces (Azure CSV, Mooncake
//! JSONL, BurstGPT CSV) and performance profiles (YAML, JSON). Valid files with bytes changed,
//! lines cut or fields swapped, and arbitrary text: the answer is a value or an error naming
//! what is wrong, never a panic, and what parses is usable (a trace in arrival order with at
//! least one request; a profile that validates).

use dopd_planner::profile::Profile;
use dopd_planner::profile::roofline::RooflineSpec;
use dopd_planner::trace::Trace;
use proptest::prelude::*;

const AZURE: &str = "TIMESTAMP,ContextTokens,GeneratedTokens\n\
2023-11-16 18:15:46.6805900,374,44\n\
2023-11-16 18:15:50.9951690,396,109\n\
2023-11-16 18:15:51.2000000,12000,2\n";

const MOONCAKE: &str = "{\"timestamp\": 0, \"input_length\": 6955, \"output_length\": 52, \"hash_ids\": [0, 1]}\n\
{\"timestamp\": 1500, \"input_length\": 100, \"output_length\": 7}\n";

const BURSTGPT: &str = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n\
5,ChatGPT,472,18,490,Conversation log\n\
45,GPT-4,1087,0,1087,Conversation log\n\
46,ChatGPT,30,300,330,API log\n";

/// Applies byte edits (kept valid UTF-8 by replacing with ASCII) and an optional cut.
fn mutate(
    text: &str,
    edits: &[(prop::sample::Index, u8)],
    cut: Option<prop::sample::Index>,
) -> String {
    let mut b = text.as_bytes().to_vec();
    for (i, v) in edits {
        let k = i.index(b.len());
        let alphabet = b" ,.:-0123456789e{}[]\"\n\rxX";
        b[k] = alphabet[usize::from(*v) % alphabet.len()];
    }
    if let Some(c) = cut {
        b.truncate(c.index(b.len() + 1));
    }
    String::from_utf8_lossy(&b).into_owned()
}

fn check_trace(text: &str) -> Result<(), TestCaseError> {
    if let Ok(t) = Trace::parse(text) {
        prop_assert!(!t.requests.is_empty());
        prop_assert!(
            t.requests
                .windows(2)
                .all(|w| w[0].arrival_ns <= w[1].arrival_ns)
        );
        prop_assert!(t.duration_s().is_finite() && t.duration_s() >= 0.0);
    }
    Ok(())
}

fn profile_text(json: bool) -> String {
    let p = RooflineSpec::llama33_70b_fp8_h100()
        .build()
        .expect("preset");
    if json { p.to_json() } else { p.to_yaml() }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10_000, ..ProptestConfig::default() })]

    #[test]
    fn a_trace_with_bytes_changed_or_cut_parses_or_is_refused(
        which in 0usize..3,
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let text = [AZURE, MOONCAKE, BURSTGPT][which];
        check_trace(&mutate(text, &edits, cut))?;
    }

    #[test]
    fn arbitrary_text_is_refused_or_parsed_as_a_trace(text in "\\PC{0,300}") {
        check_trace(&text)?;
        check_trace(&format!("TIMESTAMP,ContextTokens,GeneratedTokens\n{text}"))?;
        check_trace(&format!("{{{text}"))?;
    }

    #[test]
    fn a_profile_with_bytes_changed_or_cut_loads_or_is_refused(
        json in any::<bool>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let text = mutate(&profile_text(json), &edits, cut);
        if let Ok(p) = Profile::parse(&text) {
            // What loads has been validated: its curves answer with finite, positive times.
            prop_assert!(p.validate().is_ok());
            for isl in [1.0, 1000.0, 1e6] {
                let t = p.ttft(isl);
                prop_assert!(t.is_finite() && t >= 0.0, "ttft({isl}) = {t}");
            }
            let t = p.tpot(8.0, 1000.0);
            prop_assert!(t.is_finite() && t >= 0.0, "tpot = {t}");
        }
    }
}
