//! Prometheus metrics of the injector, served on `/metrics` of its HTTPS listener.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// `outcome` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// `injected`, `untouched`, `denied`, `invalid`.
    pub outcome: String,
}

/// The injector's metrics.
#[derive(Debug)]
pub struct Metrics {
    /// AdmissionReviews answered, by outcome.
    pub reviews: Family<Outcome, Counter>,
    /// Time to answer one AdmissionReview (body read to response built).
    pub review_seconds: Histogram,
    /// Certificate reloads, by outcome (`ok`, `error`).
    pub cert_reloads: Family<Outcome, Counter>,
    /// notAfter of the serving certificate in use (Unix seconds): alert well before it.
    pub cert_not_after: Gauge,
    /// Connections open.
    pub connections: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            reviews: Family::default(),
            review_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            cert_reloads: Family::default(),
            cert_not_after: Gauge::default(),
            connections: Gauge::default(),
        }
    }
}

impl Metrics {
    /// Counts one answered review.
    pub fn review(&self, outcome: &str, seconds: f64) {
        self.reviews
            .get_or_create(&Outcome {
                outcome: outcome.into(),
            })
            .inc();
        self.review_seconds.observe(seconds);
    }

    /// Counts one certificate reload.
    pub fn reload(&self, outcome: &str) {
        self.cert_reloads
            .get_or_create(&Outcome {
                outcome: outcome.into(),
            })
            .inc();
    }

    /// A registry over these metrics (cheap: the metrics are shared handles).
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("keyhaven_injector");
        r.register(
            "admission_reviews",
            "AdmissionReviews answered, by outcome",
            self.reviews.clone(),
        );
        r.register(
            "admission_review_seconds",
            "Time to answer one AdmissionReview",
            self.review_seconds.clone(),
        );
        r.register(
            "cert_reloads",
            "Serving certificate reloads, by outcome",
            self.cert_reloads.clone(),
        );
        r.register(
            "cert_not_after_seconds",
            "notAfter of the serving certificate in use, Unix seconds",
            self.cert_not_after.clone(),
        );
        r.register(
            "connections_open",
            "HTTPS connections open",
            self.connections.clone(),
        );
        r
    }
}
