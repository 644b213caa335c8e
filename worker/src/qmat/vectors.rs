//! The vector instructions the CPU kernels use: the best the CPU has (pulp's detection), or
//! AVX2 at most where the environment says `DOPD_CPU_VECTORS=avx2`. The cap is for measuring,
//! on an AVX-512 machine, what a machine with AVX2 only does (`docs/benchmarks.md`); it is read
//! once per process.

use std::sync::OnceLock;

/// Whether AVX-512 is set aside (`DOPD_CPU_VECTORS=avx2`). Another value is reported once and
/// ignored.
fn capped() -> bool {
    static CAP: OnceLock<bool> = OnceLock::new();
    *CAP.get_or_init(|| {
        let value = std::env::var("DOPD_CPU_VECTORS").ok();
        cap_of(value.as_deref()).unwrap_or_else(|e| {
            tracing::warn!("{e}; using the CPU's best vectors");
            false
        })
    })
}

/// What a value of `DOPD_CPU_VECTORS` asks: `avx2` caps the level, unset, empty or `best`
/// does not, anything else is an error naming the value.
fn cap_of(value: Option<&str>) -> Result<bool, String> {
    match value.map(str::trim) {
        None | Some("") => Ok(false),
        Some(v) if v.eq_ignore_ascii_case("best") => Ok(false),
        Some(v) if v.eq_ignore_ascii_case("avx2") => Ok(true),
        Some(v) => Err(format!(
            "DOPD_CPU_VECTORS={v:?} is neither `avx2` nor `best`"
        )),
    }
}

/// pulp's dispatcher at the level in force: what `pulp::Arch::new()` gives, or its AVX2 level
/// when capped (on x86-64 CPUs that have AVX2).
pub(crate) fn arch() -> pulp::Arch {
    arch_for(capped())
}

/// [`arch`] with the cap given.
fn arch_for(capped: bool) -> pulp::Arch {
    #[cfg(target_arch = "x86_64")]
    if capped && let Some(v3) = pulp::x86::V3::try_new() {
        return pulp::Arch::V3(v3);
    }
    let _ = capped;
    pulp::Arch::new()
}

/// AVX-512, unless the CPU lacks it or it is set aside.
#[cfg(target_arch = "x86_64")]
pub(crate) fn v4() -> Option<pulp::x86::V4> {
    v4_for(capped())
}

/// [`v4`] with the cap given.
#[cfg(target_arch = "x86_64")]
fn v4_for(capped: bool) -> Option<pulp::x86::V4> {
    if capped {
        return None;
    }
    pulp::x86::V4::try_new()
}

/// AVX2 with FMA (the level below AVX-512), where the CPU has it.
#[cfg(target_arch = "x86_64")]
pub(crate) fn v3() -> Option<pulp::x86::V3> {
    pulp::x86::V3::try_new()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Capped, the dispatcher and the AVX-512 kernels' token are AVX2's and none (on x86-64
    /// CPUs with AVX2); uncapped, pulp's own choice.
    #[test]
    fn the_cap_sets_avx512_aside_in_the_dispatcher_and_the_kernels() {
        #[cfg(target_arch = "x86_64")]
        {
            assert!(v4_for(true).is_none());
            assert_eq!(v4_for(false).is_some(), pulp::x86::V4::try_new().is_some());
            if pulp::x86::V3::try_new().is_some() {
                assert!(matches!(arch_for(true), pulp::Arch::V3(_)));
            }
        }
        assert_eq!(
            std::mem::discriminant(&arch_for(false)),
            std::mem::discriminant(&pulp::Arch::new())
        );
    }

    #[test]
    fn only_avx2_caps_the_vectors_and_other_values_are_named() {
        assert_eq!(cap_of(None), Ok(false));
        assert_eq!(cap_of(Some("")), Ok(false));
        assert_eq!(cap_of(Some("best")), Ok(false));
        assert_eq!(cap_of(Some("AVX2")), Ok(true));
        assert_eq!(cap_of(Some(" avx2 ")), Ok(true));
        let e = cap_of(Some("avx512")).expect_err("not a level it knows");
        assert!(e.contains("\"avx512\""), "{e}");
    }
}
