//! `dopd doctor`: what this binary and this machine (or container) give a worker: the devices the
//! build serves on, UCX for KV transfer, the CUDA user-space libraries burn-cuda loads (NVRTC;
//! the runtime beside it) and the NVIDIA driver. A container image is checked with it on a
//! machine without a GPU, and a node's missing driver shows before a model loads.
//!
//! Libraries are looked for, not loaded (loading is the `ucx` crate's job, and the driver's), in
//! the directories the dynamic loader searches: `LD_LIBRARY_PATH`, those `/etc/ld.so.conf` names
//! and the usual defaults.

use std::path::{Path, PathBuf};

use anyhow::bail;

use super::worker::Device;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The device to check for: `cpu`, or `cuda` (the default in a build with the `cuda` feature).
    /// Fails when that device cannot serve here.
    #[arg(long, value_enum)]
    pub device: Option<Device>,
}

/// A library the CUDA device loads at run time: its file-name prefix and what it is for.
const CUDA_USER_SPACE: [(&str, &str); 3] = [
    ("libnvrtc.so", "NVRTC, compiles the kernels (burn-cuda)"),
    ("libnvrtc-builtins.so", "NVRTC's built-ins"),
    ("libcudart.so", "the CUDA runtime"),
];

pub fn run(a: Args) -> anyhow::Result<()> {
    let cuda_built = cfg!(feature = "cuda");
    let device = a.device.unwrap_or(if cuda_built {
        Device::Cuda
    } else {
        Device::Cpu
    });
    println!(
        "build: dopd {} serving on {}",
        env!("CARGO_PKG_VERSION"),
        if cuda_built { "cpu, cuda" } else { "cpu" }
    );
    match dopd_ucx::Ucx::start() {
        Ok(u) if u.info().transports.is_empty() => println!(
            "ucx: libucp {} but no transport is usable here; KV blocks would move over gRPC",
            u.info().version
        ),
        Ok(u) => println!(
            "ucx: libucp {} with transports {} (KV blocks move over UCX)",
            u.info().version,
            u.info().transports.join(",")
        ),
        Err(e) => println!("ucx: not available ({e}); KV blocks would move over gRPC"),
    }
    if device == Device::Cpu {
        println!("device cpu: ready");
        return Ok(());
    }
    if !cuda_built {
        bail!("device cuda: this dopd was built without CUDA (rebuild with --features cuda)");
    }
    let dirs = library_dirs();
    let mut missing = Vec::new();
    for (prefix, what) in CUDA_USER_SPACE {
        match find_library(&dirs, prefix) {
            Some(p) => println!("cuda: {} ({what})", p.display()),
            None => {
                println!("cuda: {prefix}* not found ({what})");
                missing.push(prefix);
            }
        }
    }
    let driver = find_driver(&dirs);
    let devices = nvidia_devices();
    match &driver {
        Some(p) => println!("nvidia driver: {}", p.display()),
        None => println!("nvidia driver: libcuda.so.1 not found"),
    }
    println!(
        "gpu devices: {}",
        if devices.is_empty() {
            "none (no /dev/nvidia0)".to_string()
        } else {
            devices.join(", ")
        }
    );
    if driver.is_none() || devices.is_empty() {
        bail!(
            "device cuda: no GPU present here: {}. On Kubernetes, request nvidia.com/gpu so the \
             device plugin mounts the GPU and its driver into the container",
            no_gpu_reason(driver.is_some(), !devices.is_empty())
        );
    }
    if !missing.is_empty() {
        bail!(
            "device cuda: the GPU is present but {} not found; the image must carry the CUDA \
             user-space libraries (NVRTC)",
            missing.join(", ")
        );
    }
    println!("device cuda: ready");
    Ok(())
}

fn no_gpu_reason(driver: bool, devices: bool) -> &'static str {
    match (driver, devices) {
        (false, false) => {
            "neither the NVIDIA driver library (libcuda.so.1) nor a /dev/nvidia* device"
        }
        (false, true) => "a /dev/nvidia* device but no NVIDIA driver library (libcuda.so.1)",
        _ => "the NVIDIA driver library but no /dev/nvidia* device",
    }
}

/// Fails with a clear message when the NVIDIA driver library cannot be found (burn-cuda would
/// panic deep inside its runtime instead).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub fn check_cuda() -> anyhow::Result<()> {
    if find_driver(&library_dirs()).is_some() {
        return Ok(());
    }
    bail!(
        "--device cuda: the NVIDIA driver library (libcuda.so.1) was not found on LD_LIBRARY_PATH \
         or in the loader's directories; is this a GPU machine with the driver installed? \
         (`dopd doctor --device cuda` lists what is there)"
    )
}

fn find_driver(dirs: &[PathBuf]) -> Option<PathBuf> {
    dirs.iter()
        .flat_map(|d| [d.join("libcuda.so.1"), d.join("libcuda.so")])
        .find(|p| p.exists())
}

/// `/dev/nvidia0`, `/dev/nvidia1`, ... (not the control devices).
fn nvidia_devices() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/dev")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| {
                    n.strip_prefix("nvidia")
                        .is_some_and(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
                })
                .map(|n| format!("/dev/{n}"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The first file in `dirs` whose name is `prefix` or `prefix.VERSION`.
fn find_library(dirs: &[PathBuf], prefix: &str) -> Option<PathBuf> {
    for d in dirs {
        let Ok(rd) = std::fs::read_dir(d) else {
            continue;
        };
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n == prefix || n.strip_prefix(prefix).is_some_and(|r| r.starts_with('.')))
            .collect();
        names.sort();
        if let Some(n) = names.first() {
            return Some(d.join(n));
        }
    }
    None
}

/// The directories the dynamic loader searches, in its order: `LD_LIBRARY_PATH`, the
/// `/etc/ld.so.conf` entries (with their `include`s), then the defaults and the places GPU
/// container runtimes mount the driver.
fn library_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var("LD_LIBRARY_PATH")
        .unwrap_or_default()
        .split(':')
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .collect();
    ld_so_conf(Path::new("/etc/ld.so.conf"), &mut dirs, 0);
    for d in [
        "/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu",
        "/lib/aarch64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/lib64",
        "/usr/lib64",
        "/lib",
        "/usr/lib",
        "/usr/local/nvidia/lib64",
        "/usr/local/nvidia/lib",
        "/usr/local/cuda/lib64",
        "/usr/lib/wsl/lib",
    ] {
        dirs.push(PathBuf::from(d));
    }
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| seen.insert(d.clone()));
    dirs
}

fn ld_so_conf(file: &Path, out: &mut Vec<PathBuf>, depth: usize) {
    let Ok(text) = std::fs::read_to_string(file) else {
        return;
    };
    if depth > 4 {
        return;
    }
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if let Some(pattern) = line.strip_prefix("include") {
            for f in glob_conf(pattern.trim()) {
                ld_so_conf(&f, out, depth + 1);
            }
        } else if !line.is_empty() {
            out.push(PathBuf::from(line));
        }
    }
}

/// `include` patterns as ld.so.conf writes them: a directory and a `*.conf`-style file glob.
fn glob_conf(pattern: &str) -> Vec<PathBuf> {
    let p = Path::new(pattern);
    let (Some(dir), Some(name)) = (p.parent(), p.file_name().and_then(|n| n.to_str())) else {
        return Vec::new();
    };
    let (head, tail) = name.split_once('*').unwrap_or((name, ""));
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|f| {
                    f.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(head) && n.ends_with(tail))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_versioned_libraries_and_not_their_neighbours() -> std::io::Result<()> {
        let d = std::env::temp_dir().join(format!("dopd-doctor-{}", std::process::id()));
        std::fs::create_dir_all(&d)?;
        for f in [
            "libnvrtc-builtins.so.12.6",
            "libnvrtcx.so",
            "libnvrtc.so.12",
        ] {
            std::fs::write(d.join(f), b"")?;
        }
        let dirs = vec![PathBuf::from("/nonexistent"), d.clone()];
        assert_eq!(
            find_library(&dirs, "libnvrtc.so"),
            Some(d.join("libnvrtc.so.12"))
        );
        assert_eq!(
            find_library(&dirs, "libnvrtc-builtins.so"),
            Some(d.join("libnvrtc-builtins.so.12.6"))
        );
        assert_eq!(find_library(&dirs, "libcudart.so"), None);
        assert_eq!(find_driver(&dirs), None);
        std::fs::write(d.join("libcuda.so.1"), b"")?;
        assert_eq!(find_driver(&dirs), Some(d.join("libcuda.so.1")));
        std::fs::remove_dir_all(&d)
    }

    #[test]
    fn reads_ld_so_conf_with_includes() -> std::io::Result<()> {
        let d = std::env::temp_dir().join(format!("dopd-ldconf-{}", std::process::id()));
        std::fs::create_dir_all(d.join("conf.d"))?;
        std::fs::write(
            d.join("ld.so.conf"),
            format!("# comment\ninclude {}/conf.d/*.conf\n/opt/a\n", d.display()),
        )?;
        std::fs::write(d.join("conf.d/cuda.conf"), "/usr/local/cuda/lib64 # cuda\n")?;
        std::fs::write(d.join("conf.d/skip.txt"), "/not/this\n")?;
        let mut out = Vec::new();
        ld_so_conf(&d.join("ld.so.conf"), &mut out, 0);
        assert_eq!(
            out,
            vec![
                PathBuf::from("/usr/local/cuda/lib64"),
                PathBuf::from("/opt/a")
            ]
        );
        std::fs::remove_dir_all(&d)
    }
}
