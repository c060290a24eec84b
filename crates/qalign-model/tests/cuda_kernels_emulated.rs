//! The fused CUDA kernels (`kernels/fused.cu`) run on the CPU: `kernels/emulate.h` stands in for
//! the GPU (a block as host threads with barriers, warp shuffles, and the mma.sync tile product
//! from the PTX ISA's fragment layout), and `kernels/emulate_test.cpp` checks every kernel against
//! direct double-precision formulas. No GPU, nvcc or `cuda` feature is needed: only a C++20
//! compiler and CUDA's headers for the half-precision types (`cuda_fp16.h`, `cuda_bf16.h`).
//!
//! The headers come from `QALIGN_CUDA_INCLUDE`, or from `target-cuda-sdk` when
//! `scripts/cuda-env.sh` has installed it. CI installs them (`.ci/run`); elsewhere the test says
//! it skipped when they are missing.

use std::path::{Path, PathBuf};
use std::process::Command;

fn cuda_include() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("QALIGN_CUDA_INCLUDE") {
        return Some(PathBuf::from(dir));
    }
    let sdk =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target-cuda-sdk/nvidia/cu13/include");
    sdk.join("cuda_fp16.h").exists().then_some(sdk)
}

#[test]
fn fused_kernels_match_direct_formulas_when_emulated_on_the_cpu() {
    let Some(include) = cuda_include() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must provide CUDA's headers in QALIGN_CUDA_INCLUDE (.ci/run installs them)"
        );
        eprintln!(
            "skipped: no CUDA headers (set QALIGN_CUDA_INCLUDE or source scripts/cuda-env.sh)"
        );
        return;
    };
    let kernels = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("emulate_test");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let build = Command::new(&cxx)
        .args(["-std=c++20", "-O1", "-pthread", "-Wno-unknown-pragmas"])
        .arg("-I")
        .arg(&include)
        .arg(kernels.join("emulate_test.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C++ compiler `{cxx}`: {e}"));
    assert!(
        build.status.success(),
        "emulate_test.cpp did not build:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let run = Command::new(&exe).output().unwrap();
    let report = String::from_utf8_lossy(&run.stdout);
    println!("{report}");
    assert!(run.status.success(), "kernel checks failed:\n{report}");
    // Every kernel and dtype was checked: 4 attention cases, 3 layer norms (2 with their sums),
    // 3 RMS norms, 3 × (QuickGELU, SiLU·mul).
    let passed = report.lines().filter(|l| l.ends_with(" ok")).count();
    assert_eq!(passed, 18, "expected 18 passing checks:\n{report}");
}
