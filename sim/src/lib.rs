//! The simulator's public pieces: the history format and the invariant checkers. They judge
//! any history in the format, from the simulation or from a real run (issue 5's load driver).
//! The simulation itself is the `sim` binary (`main.rs`).

pub mod checkers;
pub mod history;
