//! mimiq-perf: the network-namespace testbed, and (as the project grows) the traffic
//! generator and the reproducible experiments.
//!
//! Threading: plain blocking code; every process it starts runs in its own namespace.
//! Panics: none on bad input; testbed failures are `TestbedError`s naming the failed command.

pub mod capture;
pub mod demo;
pub mod direct;
pub mod etcd;
pub mod experiments;
pub mod faults;
pub mod gen;
pub mod hlog;
pub mod hopwatch;
pub mod masque;
pub mod plot;
pub mod privacy;
pub mod progress;
pub mod singlebox;
pub mod soak;
pub mod switch;
pub mod testbed;
pub mod traffic;

/// Writes `value` as pretty JSON to `path`, if there is one (the `--json` of the benches and
/// the generator).
pub fn write_json(
    path: Option<&std::path::Path>,
    value: &impl serde::Serialize,
) -> anyhow::Result<()> {
    use anyhow::Context;
    if let Some(path) = path {
        std::fs::write(path, serde_json::to_vec_pretty(value)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
