//! Prometheus metrics of the server (`GET /metrics`), in the OpenMetrics text format: what an
//! operator needs to size the deployment and to alert on it.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The label of a request counter: its HTTP status code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

/// Every metric, registered once.
pub struct Metrics {
    registry: Registry,
    /// `qalign_requests_total{status}`: scoring requests answered, by status.
    pub requests: Family<StatusLabel, Counter>,
    /// `qalign_request_duration_seconds`: scoring request latency, from arrival to answer.
    pub request_duration: Histogram,
    /// `qalign_batch_size`: files per engine batch.
    pub batch_size: Histogram,
    /// `qalign_queue_depth`: jobs waiting for the engine.
    pub queue_depth: Gauge,
    /// `qalign_images_scored_total`: files scored (images and videos).
    pub images_scored: Counter,
    /// `qalign_dropped_jobs_total`: jobs dropped unscored because their client had gone.
    pub dropped_jobs: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<StatusLabel, Counter>::default();
        registry.register(
            "qalign_requests",
            "Scoring requests answered, by HTTP status",
            requests.clone(),
        );
        // 5 ms .. ~160 s.
        let request_duration = Histogram::new(exponential_buckets(0.005, 2.0, 16));
        registry.register(
            "qalign_request_duration_seconds",
            "Scoring request latency, from arrival to answer",
            request_duration.clone(),
        );
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 10));
        registry.register(
            "qalign_batch_size",
            "Files per engine batch",
            batch_size.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "qalign_queue_depth",
            "Jobs waiting for the engine",
            queue_depth.clone(),
        );
        let images_scored = Counter::default();
        registry.register(
            "qalign_images_scored",
            "Files scored (images and videos)",
            images_scored.clone(),
        );
        let dropped_jobs = Counter::default();
        registry.register(
            "qalign_dropped_jobs",
            "Jobs dropped unscored because their client had gone",
            dropped_jobs.clone(),
        );
        Self {
            registry,
            requests,
            request_duration,
            batch_size,
            queue_depth,
            images_scored,
            dropped_jobs,
        }
    }
}

impl Metrics {
    /// Counts one answered scoring request.
    pub fn observe_request(&self, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&StatusLabel {
                status: status.to_string(),
            })
            .inc();
        self.request_duration.observe(seconds);
    }

    /// The OpenMetrics text exposition (ending with `# EOF`).
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}
