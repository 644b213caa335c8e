//! The committed CRD is the generated one, and the schema carries the rules users rely on.

#![allow(clippy::unwrap_used)]

use dopd_operator::crd::{DopdService, crd_yaml};
use kube::CustomResourceExt;

#[test]
fn committed_crd_matches_the_generated_one() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/dopdservice.yaml");
    let committed = std::fs::read_to_string(path).unwrap();
    assert!(
        committed == crd_yaml(),
        "crds/dopdservice.yaml is stale: run `cargo run -p dopd -- crd > crds/dopdservice.yaml`"
    );
    let chart = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/dopd/crds/dopdservice.yaml"
    );
    assert!(
        std::fs::read_to_string(chart).unwrap() == committed,
        "charts/dopd/crds/dopdservice.yaml differs: cp crds/dopdservice.yaml charts/dopd/crds/"
    );
}

#[test]
fn schema_has_status_subresource_columns_and_rules() {
    let crd = DopdService::crd();
    let v = &crd.spec.versions[0];
    assert!(v.subresources.as_ref().unwrap().status.is_some());
    let cols: Vec<&str> = v
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        cols,
        ["Model", "Prefill", "Decode", "Ratio", "Phase", "Age"]
    );
    let text = serde_json::to_string(&crd).unwrap();
    for rule in [
        "self.minReplicas <= self.maxReplicas",
        "self.planner.gpuBudget >=",
        "self.startsWith('/') || self.startsWith('pvc://')",
    ] {
        assert!(text.contains(rule), "missing rule {rule}");
    }
    assert_eq!(crd.spec.names.short_names, Some(vec!["dopd".to_string()]));
    // Only the formats the API server knows (it warns on any other on every apply).
    let yaml = crd_yaml();
    for line in yaml
        .lines()
        .filter(|l| l.trim_start().starts_with("format:"))
    {
        let f = line.trim_start().trim_start_matches("format:").trim();
        assert!(
            ["int32", "int64", "float", "double", "date-time"].contains(&f),
            "format {f} is not one the API server knows"
        );
    }
    // Well under Helm's 1 MB limit.
    assert!(crd_yaml().len() < 200_000);
}

#[test]
fn spec_validation_names_every_problem() {
    let mut svc: DopdService = serde_yaml::from_str(
        "apiVersion: dopd.dev/v1alpha1\nkind: DopdService\nmetadata: {name: x}\nspec:\n  model: {source: models/x.gguf}\n  slo: {ttftMs: 0, tpotMs: 50}\n  prefill: {minReplicas: 3, maxReplicas: 2}\n  planner: {gpuBudget: 3}\n",
    )
    .unwrap();
    let errs = svc.spec.validate().unwrap_err().join("\n");
    assert!(errs.contains("spec.model.source"), "{errs}");
    assert!(
        errs.contains("spec.prefill: minReplicas (3) must not exceed maxReplicas (2)"),
        "{errs}"
    );
    assert!(
        errs.contains("gpuBudget (3) is smaller than the 4 GPUs"),
        "{errs}"
    );
    assert!(errs.contains("spec.slo"), "{errs}");
    svc.spec.model.source = "/models/x.gguf".into();
    svc.spec.slo.ttft_ms = 1000;
    svc.spec.prefill.min_replicas = 1;
    svc.spec.planner.gpu_budget = 2;
    assert_eq!(svc.spec.validate(), Ok(()));
    assert_eq!(svc.spec.served_name(), "x");
}

#[test]
fn examples_parse_and_validate() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml") {
            let text = std::fs::read_to_string(&p).unwrap();
            let svc: DopdService =
                serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            svc.spec
                .validate()
                .unwrap_or_else(|e| panic!("{}: {e:?}", p.display()));
            n += 1;
        }
    }
    assert!(n >= 2, "expected examples/*.yaml");
}

#[test]
fn slo_reaches_the_planner_with_its_per_token_allowance() {
    let svc: DopdService = serde_yaml::from_str(
        "apiVersion: dopd.dev/v1alpha1\nkind: DopdService\nmetadata: {name: x}\nspec:\n  model: {source: /models/x.gguf}\n  slo: {ttftMs: 1500, tpotMs: 60, ttftPerTokenMs: 0.25}\n  planner: {gpuBudget: 4}\n",
    )
    .unwrap();
    let c = dopd_operator::reconcile::planner_config(&svc.spec);
    assert_eq!(c.slo.ttft_s, 1.5);
    assert_eq!(c.slo.tpot_s, 0.06);
    assert_eq!(c.slo.ttft_per_token_s, 0.00025);
    // A 4,000-token prompt is allowed one more second.
    assert!((c.slo.ttft_at(4000.0) - 2.5).abs() < 1e-9);
    assert!(c.validate().is_ok());
}
