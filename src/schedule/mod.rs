//! Sampling schedule: flow-matching UniPC and the diffusion-forcing step matrix.

pub mod df;
pub mod magi;
pub mod unipc;

pub use df::StepMatrix;
pub use unipc::{FlowSchedule, SchedulerConfig, UniPcState};
