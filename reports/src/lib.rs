//! Reports a person would rather look at than read: a simulation run's report (Markdown,
//! JSON, SVG plots) and the capacity plan for the model's DAU.
//!
//! This crate only lays figures out; the simulator measures them (`sim::metrics`) and the
//! workload model supplies the population (`workloads::model`).

pub mod capacity;
pub mod plot;
pub mod run;

/// `1/N` for a population scale.
pub fn scale_label(scale: f64) -> String {
    workloads::model::Scale(scale).to_string()
}
