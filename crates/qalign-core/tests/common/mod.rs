//! Shared helpers for the integration tests: fixture paths and small assertions.
#![allow(dead_code)]

use std::path::PathBuf;

pub fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
}

pub fn labels(name: &str) -> PathBuf {
    fixtures().join("labels").join(name)
}

pub fn assert_close(actual: f64, expected: f64, tol: f64, what: &str) {
    assert!(
        (actual - expected).abs() <= tol,
        "{what}: got {actual:.17}, expected {expected:.17} (tolerance {tol:e})"
    );
}
