//! Compiles the fused CUDA kernels (`kernels/fused.cu`) to PTX with nvcc when the `cuda` feature
//! is on. A CPU build runs nothing here and never needs nvcc.

use std::path::PathBuf;
use std::process::Command;

/// mma.sync on bf16 (the attention kernel) needs compute capability 8.0 or newer.
const MIN_COMPUTE_CAP: u32 = 80;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo::rerun-if-changed=kernels/fused.cu");
    for var in ["CUDA_COMPUTE_CAP", "NVCC", "CUDA_ROOT"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let cap = match std::env::var("CUDA_COMPUTE_CAP") {
        Ok(v) => v
            .trim()
            .parse::<u32>()
            .unwrap_or_else(|_| panic!("CUDA_COMPUTE_CAP={v:?} is not a number such as 90")),
        Err(_) => MIN_COMPUTE_CAP,
    };
    assert!(
        cap >= MIN_COMPUTE_CAP,
        "CUDA_COMPUTE_CAP={cap}: qalign's fused kernels need compute capability {MIN_COMPUTE_CAP} or newer"
    );
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CUDA_ROOT").map(|root| PathBuf::from(root).join("bin/nvcc")))
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let out =
        PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("fused.ptx");
    let result = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", "--expt-relaxed-constexpr"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("kernels/fused.cu")
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "the `cuda` feature needs nvcc ({}): {e}; `source scripts/cuda-env.sh` installs it",
                nvcc.display()
            )
        });
    assert!(
        result.status.success(),
        "nvcc failed on kernels/fused.cu:\n{}",
        String::from_utf8_lossy(&result.stderr)
    );
}
